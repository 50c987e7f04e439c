"""The operator library, importable as ``tokenprune.operators`` (one file per kind)."""

from tokenprune.operators import compactors, learned, mergers, scorers, selectors, shift  # noqa: F401  (registration)
