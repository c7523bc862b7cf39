"""Environments: what the policy sees, and how its answers are rewarded."""
