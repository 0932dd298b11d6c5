"""Moved to ``globalcom2.tools.model_args``; this path keeps working with a DeprecationWarning."""

from .._moved import alias

alias(__name__, "globalcom2.tools.model_args")
