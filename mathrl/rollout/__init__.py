"""Sampling completions (behind the Sampler protocol) and running episodes."""
