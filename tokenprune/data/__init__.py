"""Benchmarks that ship with tokenprune (no download needed)."""
