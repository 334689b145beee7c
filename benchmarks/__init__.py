"""Benchmarks of ptv2_fast, installed as ``ptv2_fast.benchmarks`` so that ``ptv2-fast bench`` works from a wheel.

They use only the public API and the reference: ``baselines`` defines the concatenating paths of
DESIGN.md §6 once; ``op_bench`` times every provider on a shape and reports time, ratios, TFLOP/s and memory.
"""
