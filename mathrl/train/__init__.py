"""Entrypoints that change weights: GRPO (rl.py)."""
