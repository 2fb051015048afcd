"""The plain model: weights located and checked, the classifier built (quantized, LoRA), the pairwise head, precision,
and the memory planner. Nothing here makes the model faster: that is :mod:`trainer_core.fastpath`."""
