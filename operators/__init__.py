"""The operator library, importable as ``tokenprune.operators`` (one file per kind)."""

from tokenprune.operators import compactors, scorers, selectors  # noqa: F401  (registration)
