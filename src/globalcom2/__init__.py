"""globalcom2: training-free visual-token compression for AnyRes multimodal LLMs.

>>> import globalcom2
>>> globalcom2.apply(model, retention_ratio=0.25)   # patches this instance only
>>> globalcom2.remove(model)                         # stock model again
"""

from .budget import num_image_tokens
from .methods import GlobalCom2Config, MethodConfig, available_methods, make_config
from .patch import apply, get_config, is_patched, remove

__version__ = "0.1.0"

__all__ = [
    "apply",
    "remove",
    "is_patched",
    "get_config",
    "available_methods",
    "make_config",
    "num_image_tokens",
    "GlobalCom2Config",
    "MethodConfig",
    "__version__",
]
