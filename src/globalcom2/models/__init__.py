"""Model adapters. One module per model family; LLaVA-NeXT is the first."""

from . import llava_next

__all__ = ["llava_next"]
