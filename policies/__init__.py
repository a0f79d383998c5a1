"""Policy networks (installed as rl_adapt.policies)."""
