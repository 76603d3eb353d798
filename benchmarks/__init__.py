"""Benchmarks of the qa-lora pipeline: ratios measured in one run (not tests; no timing assertions).

Run `python -m benchmarks.run [--quick] [--only NAME] [--device cpu|cuda]`; see benchmarks/RESULTS.md.
"""
