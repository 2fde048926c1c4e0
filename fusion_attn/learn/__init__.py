"""Learning: training the fusion model (`fusion-attn train`) and testing it under sensor faults
(`fusion-attn eval-robustness`). Read in this order:

    data.py         episodes and recordings through the node's data path, the shard cache, datasets
    augment.py      sensor faults applied to tokenized batches
    objectives.py   targets, heads, losses, the attention-free baselines, the heads file
    evaluation.py   one evaluation per fault condition, for validation and robustness alike
    loop.py         TrainConfig, the resumable training state, provenance, `train`
    robustness.py   trained runs compared under every single-sensor fault and a τ sweep
"""
