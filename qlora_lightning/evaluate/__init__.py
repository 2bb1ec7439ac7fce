"""Evaluation and inference: greedy generation, answer checks, the GSM8K exact-match callback,
merging an adapter into its base, GGUF export and model cards, lm-evaluation-harness on the model as
trained (``lmeval``: the ``eval`` command and ``LMEvalCallback``), and what a run records through
its loggers, whichever they are (``tracking``: the run folder, resuming a logger's run, tables).

May import: the foundation (``errors``, ``paths``, ``losses``, ``compat``, ``bounds``), ``speed``,
``model``, ``data`` and ``evaluate`` itself.
"""
