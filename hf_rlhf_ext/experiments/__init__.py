"""The chapter's experiments, built on the public API of the trainers, callbacks and ``run``: β sweeps, PPO vs GRPO,
REINFORCE baselines, reward-model ensembles, best-of-N, penalty vs early stopping, and the report whose claims are
decided by numbers. Nothing is re-exported here; import each experiment from its module.
"""
