"""The pure math of policy-gradient RL: advantages, per-token losses, loss aggregation."""
