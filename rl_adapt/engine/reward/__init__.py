"""The reward PPO optimises: the reward network (:mod:`.network`), what it learns from (:mod:`.dataset`), and the
per-pixel reward assembled from it, the corrections and the anatomical penalties (:mod:`.blend`)."""
