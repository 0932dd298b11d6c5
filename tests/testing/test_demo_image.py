"""One image-size convention, (height, width): ``demo_image`` takes keywords only; the deprecated
``globalcom2.tiny.demo_image(width, height)`` keeps its old positional order with a DeprecationWarning."""

from __future__ import annotations

import importlib
import sys
import warnings

import pytest

from globalcom2.testing import demo_image


def test_demo_image_is_keyword_only_height_then_width():
    img = demo_image(height=220, width=300)
    assert (img.height, img.width) == (220, 300) and img.size == (300, 220)  # PIL's size is (width, height)
    with pytest.raises(TypeError):
        demo_image(300, 220)  # positional order is no longer guessable
    with pytest.raises(ValueError, match="height must be a positive int"):
        demo_image(height=0, width=10)
    assert demo_image(height=5, width=7, seed=3).tobytes() == demo_image(width=7, height=5, seed=3).tobytes()


def test_deprecated_tiny_module_keeps_the_old_positional_order():
    sys.modules.pop("globalcom2.tiny", None)
    with pytest.warns(DeprecationWarning, match="globalcom2.tiny moved to globalcom2.testing"):
        tiny = importlib.import_module("globalcom2.tiny")
    with pytest.warns(DeprecationWarning, match=r"demo_image\(height=220, width=300\)"):
        old = tiny.demo_image(300, 220, seed=4)
    assert old.size == (300, 220)
    assert old.tobytes() == demo_image(height=220, width=300, seed=4).tobytes()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        assert tiny.demo_image().size == demo_image().size  # the same defaults
    assert tiny.tiny_model is importlib.import_module("globalcom2.testing").tiny_model
