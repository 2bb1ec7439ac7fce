"""The model: the training plan every lever reads (``plan``), building the quantized base and its
LoRA adapters as the plan says (``build``), GGUF files and hub ids as bases, named adapter sets, and
what DDP and FSDP need to know about a 4-bit PEFT model.

May import: the foundation (``errors``, ``paths``, ``losses``, ``compat``, ``bounds``), ``speed``
and ``model`` itself.
"""
