"""Shared fixtures: tiny random LLaVA-NeXT models and a local processor (nothing is downloaded)."""

from __future__ import annotations

import pytest
import torch

from globalcom2.tiny import demo_image, tiny_model, tiny_processor

PROMPT = "USER: <image>\nwhat is this ? ASSISTANT:"


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
    return [demo_image(300, 220, seed=1), demo_image(150, 400, seed=2), demo_image(500, 120, seed=3)]


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
