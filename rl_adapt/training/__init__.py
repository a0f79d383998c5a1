"""Supervised training: the source model (:mod:`.pretrain`) and the loop and losses every trainer shares."""
