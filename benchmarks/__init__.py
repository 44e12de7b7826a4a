"""Benchmarks: timing sweeps whose results are committed under benchmarks/results/ (never asserted)."""
