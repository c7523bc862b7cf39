"""Benchmark evaluation of math models (`mathrl eval`)."""
