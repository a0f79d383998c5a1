"""Gymnasium environments (installed as rl_adapt.envs)."""
