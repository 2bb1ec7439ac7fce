"""Speed and memory levers: activation checkpointing and offload, the LoRA forwards, the 4-bit
matmul, the host's answers to mask checks, optimizers without host-device waits, the collector's
clock, lagged reads of GPU results, and the peak-memory estimator (which ``auto`` in the training
plan asks).

May import: the foundation (``errors``, ``paths``, ``losses``, ``compat``, ``bounds``) and
``speed`` itself.
"""
