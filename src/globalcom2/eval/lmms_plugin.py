"""Moved to ``globalcom2.integrations.lmms_eval.plugin``; this path keeps working with a DeprecationWarning."""

from .._moved import alias

alias(__name__, "globalcom2.integrations.lmms_eval.plugin")
