"""The shipped pipeline presets (YAML), importable as ``tokenprune.presets`` for packaging."""
