"""What finds W ∈ S: ADMM (its metric and state), SS-Auto, masked mapping, the heuristic
baselines, one-shot pruning. Imports ``sets``, ``weights`` and ``structure``."""
