"""Benchmarks that print numbers and write JSON (speed targets live here, never in timed tests)."""
