"""Integrations with serving engines. Each sub-package imports its engine lazily; ``import globalcom2`` never does."""
