"""The adaptation engine (RL4Seg): typed stages (:mod:`.stages`) chained by the loop (:mod:`.loop`): rollout of the
policy, correction (:mod:`.corrector`, :mod:`.shape_prior`), the reward PPO optimises (:mod:`.reward`), pixel-wise
PPO (:mod:`.ppo`), the label-free guard, and export."""
