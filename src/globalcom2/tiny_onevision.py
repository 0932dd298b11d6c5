"""Moved to ``globalcom2.testing.tiny_onevision``; this path keeps working with a DeprecationWarning."""

from ._moved import alias

alias(__name__, "globalcom2.testing.tiny_onevision")
