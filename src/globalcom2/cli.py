"""Moved to ``globalcom2.tools.cli``; this path keeps working with a DeprecationWarning (also ``python -m``)."""

if __name__ == "__main__":
    from globalcom2.tools.cli import main

    raise SystemExit(main())

from ._moved import alias  # noqa: E402

alias(__name__, "globalcom2.tools.cli")
