"""Evaluation and inference: greedy generation, answer checks, the GSM8K exact-match callback, and
merging an adapter into its base.

May import: the foundation (``errors``, ``paths``, ``losses``, ``compat``, ``bounds``), ``speed``,
``model``, ``data`` and ``evaluate`` itself.
"""
