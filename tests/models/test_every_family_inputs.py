"""Odd input on every family, ``forward`` and ``generate``, vision-side and in-LLM methods alike: ``pixel_values``
with the wrong channel count, as a list of tensors, or not a float tensor is an error naming ``pixel_values``;
``apply(model, 0.25)`` asks whether ``retention_ratio=0.25`` was meant; ``num_image_tokens`` with options counts
the config ``apply`` runs with those options."""

from __future__ import annotations

import pytest
import torch

import globalcom2
from globalcom2.models import adapter_for
from globalcom2.testing import demo_image


def _variants(pv: torch.Tensor) -> dict:
    if pv.dim() == 2:  # Qwen-VL: flat patches (patches, C x t x p x p)
        return {
            "a list of tensors": list(pv),
            "a tuple of tensors": tuple(pv),
            "a patch width off by one": pv[:, :-1],
            "a NumPy array": pv.numpy(),
        }
    one = pv[..., :1, :, :]
    return {
        "a list of tensors": list(pv),
        "a tuple of tensors": tuple(pv),
        "1 channel": one,
        "4 channels": torch.cat([pv, one], dim=-3),
        "a NumPy array": pv.numpy(),
    }


@pytest.mark.parametrize("method", ["globalcom2", "fastv"])
@pytest.mark.parametrize("call", ["forward", "generate"])
def test_bad_pixel_values_name_pixel_values(family, method, call):
    inputs = family.inputs([demo_image(height=220, width=300)])
    globalcom2.apply(family.model, method=method, retention_ratio=0.25)
    run = family.model if call == "forward" else (lambda **kw: family.model.generate(**kw, max_new_tokens=1))
    for what, bad in _variants(inputs["pixel_values"]).items():
        with pytest.raises((TypeError, ValueError), match="pixel_values") as err:
            with torch.no_grad():
                run(**dict(inputs, pixel_values=bad))
        assert "pass the processor's output" in str(err.value) or "processor" in str(err.value), (what, err.value)


def test_a_bare_number_for_the_method_asks_for_retention_ratio(family):
    with pytest.raises(TypeError, match=r"did you mean retention_ratio=0\.25\?"):
        globalcom2.apply(family.model, 0.25)
    assert not globalcom2.is_patched(family.model)
    with pytest.raises(TypeError, match=r"did you mean retention_ratio=0\.25\?"):
        globalcom2.num_image_tokens(family.model.config, (220, 300), 0.25)


def test_num_image_tokens_with_options_is_the_config_apply_runs(family):
    """Both start from the method's defaults: the same words give the same config, on a patched model too."""
    size = (220, 300)
    globalcom2.apply(family.model, method="fastervlm", retention_ratio=0.5)
    proc = {"processor": family.processor}
    running = globalcom2.num_image_tokens(family.model, size, **proc)  # the patched model's own config
    assert running == globalcom2.num_image_tokens(family.model.config, size, "fastervlm", retention_ratio=0.5, **proc)
    options = {"retention_ratio": 0.3}  # a new config from fastervlm's defaults, not 0.5 with one field changed
    counted = globalcom2.num_image_tokens(family.model, size, **options, **proc)
    globalcom2.apply(family.model, method="fastervlm", **options)
    assert counted == globalcom2.num_image_tokens(family.model, size, **proc)
    resolve = adapter_for(family.model).resolve  # the family's mapping (e.g. scorer "auto" -> its own scorer)
    expected = resolve(globalcom2.make_config("fastervlm", **options), family.model.config)
    assert resolve(globalcom2.get_config(family.model), family.model.config) == expected
