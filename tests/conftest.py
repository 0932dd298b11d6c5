"""Shared fixtures: tiny random LLaVA-NeXT models and a local processor (nothing is downloaded)."""

from __future__ import annotations

import dataclasses
import sys

import pytest
import torch

from globalcom2.methods import Requirements, VisionMethod
from globalcom2.testing.tiny import demo_image, tiny_model, tiny_processor

PROMPT = "USER: <image>\nwhat is this ? ASSISTANT:"


@pytest.fixture(autouse=True)
def _close_figures():
    """Close the pyplot figures a test leaves open (``viz.render`` returns a pyplot figure, kept until closed)."""
    yield
    plt = sys.modules.get("matplotlib.pyplot")
    if plt is not None:
        plt.close("all")


@pytest.fixture(scope="session")
def processor():
    return tiny_processor()


@pytest.fixture
def model():
    """A fresh fp32 SDPA tiny model per test (patching state never leaks between tests)."""
    return tiny_model(seed=0)


@pytest.fixture(scope="session")
def images():
    """Images of different sizes and aspect ratios (different AnyRes grids and paddings)."""
    return [
        demo_image(height=220, width=300, seed=1),
        demo_image(height=400, width=150, seed=2),
        demo_image(height=120, width=500, seed=3),
    ]


def make_inputs(processor, imgs, prompts=None):
    # channels_last: before transformers 5.4 the NumPy image processor guesses the channel axis and reads an
    # image 1 or 3 px high, shape (3, W, 3), as channels-first
    prompts = prompts or [PROMPT] * len(imgs)
    return processor(images=imgs, text=prompts, return_tensors="pt", input_data_format="channels_last", padding=True)


def lm_inputs(model):
    """Record what the language model receives: (inputs_embeds, attention_mask, position_ids) per call."""
    seen = []

    def hook(_module, args, kwargs):
        seen.append((kwargs.get("inputs_embeds"), kwargs.get("attention_mask"), kwargs.get("position_ids")))

    handle = model.model.language_model.register_forward_pre_hook(hook, with_kwargs=True)
    return seen, handle


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


@dataclasses.dataclass(frozen=True)
class Probe(VisionMethod):
    """A vision-side config that only states requirements: runs the adapter's tower pass with any scorer/layer."""

    name = "probe"
    score_layer: int | None = -1
    score: str = "logits"
    scorer: str = "cls"

    @property
    def requires(self) -> Requirements:
        return Requirements(score_layer=self.score_layer, score=self.score, scorer=self.scorer)


def encode(model, pixel_values, image_sizes, return_hidden=False, **requires):
    """LLaVA-NeXT's tower pass (``encode_views``) as (features, scores, sizes[, hidden states]) per image."""
    from globalcom2.models import llava_next

    enc = llava_next.encode_views(model, Probe(**requires), pixel_values, {"image_sizes": image_sizes})
    out = (enc.features, enc.scores, enc.sizes)
    return (*out, enc.hidden_states) if return_hidden else out


# ---------------------------------------------------------------------------- every family


def _family_cases():
    """(family name, () -> (model, processor), images, prompt) for every supported family (tiny, offline)."""
    from globalcom2.testing import (
        qwen_prompt,
        tiny_internvl_model,
        tiny_internvl_processor,
        tiny_onevision_model,
        tiny_onevision_processor,
        tiny_qwen2_5_vl_model,
        tiny_qwen2_5_vl_processor,
        tiny_qwen3_vl_model,
        tiny_qwen3_vl_processor,
    )

    return {
        "llava_next": (lambda: (tiny_model(seed=0), tiny_processor()), PROMPT),
        "llava_onevision": (lambda: (tiny_onevision_model(), tiny_onevision_processor()), PROMPT),
        "internvl": (lambda: (tiny_internvl_model(), tiny_internvl_processor()), "<IMG_CONTEXT> what is this ?"),
        "qwen2_5_vl": (lambda: (tiny_qwen2_5_vl_model(), tiny_qwen2_5_vl_processor()), qwen_prompt()),
        "qwen3_vl": (lambda: (tiny_qwen3_vl_model(), tiny_qwen3_vl_processor()), qwen_prompt()),
    }


FAMILY_NAMES = tuple(_family_cases())


@dataclasses.dataclass
class Family:
    """One family's tiny model, processor and a prompt, plus how to call the patched model on images."""

    name: str
    model: torch.nn.Module
    processor: object
    prompt: str

    def inputs(self, images):
        """Processor output for ``images`` (one prompt each) plus what the family's inputs lack."""
        from globalcom2.models import adapter_for

        out = dict(make_inputs(self.processor, images, [self.prompt] * len(images)))
        out.update(adapter_for(self.model).processor_kwargs(self.processor, images))
        return out


@pytest.fixture(params=FAMILY_NAMES)
def family(request):
    """Every supported family in turn (registry-parametrised, as timm's tests are)."""
    build, prompt = _family_cases()[request.param]
    model, processor = build()
    return Family(request.param, model, processor, prompt)


@pytest.fixture(params=("qwen2_5_vl", "qwen3_vl"))
def qwen(request):
    """(family name, fresh tiny model, processor) for each Qwen-VL family (tests/models/qwen)."""
    from globalcom2.testing import DEMO_MODELS

    return (request.param, *DEMO_MODELS[request.param]())
