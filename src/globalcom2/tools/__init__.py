"""Tools on top of the library: the ``globalcom2`` CLI and what it runs (demo, flops, bench, viz, report).

Optional dependencies (matplotlib, tqdm, lmms-eval) are imported inside the tool that needs them, when it runs.
"""
