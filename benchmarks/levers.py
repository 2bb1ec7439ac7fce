"""The configurations the harness measures: the project's path under each variant (a set of lever
values, as ``SFTModule`` / ``BaseModelSpec`` options), and the implementations beside it."""

from __future__ import annotations

# Speed/memory levers of the project's path, as overrides of SFTModule / BaseModelSpec options;
# `default` is what the project does when none is set (on a GPU: compiled layers). The Liger
# variants run eagerly, as they were first measured: compiling fuses what Liger's kernels fuse.
LEVERS = {
    "gradient_checkpointing": True,
    "loss_chunk_size": None,
    "liger_kernel": False,
    "upcast_frozen": False,
    "attn_implementation": "sdpa",
    "compile_layers": "auto",
    "compile_scope": "parts",
    "cpu_embeddings": False,
    "lora_dropout": 0.05,
    "lean_forward": False,
    "skip_last_recompute": True,
    "optimizer": "paged_adamw_8bit",
    "compiled_dequant_tokens": None,
    "freeze_heap": True,
}
LIGER = {"liger_kernel": True, "compile_layers": False}
OFFLOAD_CHUNKED = {"gradient_checkpointing": "offload", "loss_chunk_size": 1024}
LEANEST = {
    **LEVERS,
    **OFFLOAD_CHUNKED,
    "cpu_embeddings": True,
    "lora_dropout": 0.0,
    "lean_forward": True,
}
# Small batches: no recomputation, every saved activation in CPU memory.
SMALL_BATCH = {**LEANEST, "gradient_checkpointing": "offload_all", "optimizer": "adamw_8bit"}
VARIANTS: dict[str, dict] = {
    "default": LEVERS,
    "eager": {**LEVERS, "compile_layers": False},
    "upcast": {**LEVERS, "upcast_frozen": True},  # PEFT's fp32 embeddings, head and norms
    "chunked_ce": {**LEVERS, "loss_chunk_size": 1024},
    "chunked_ce+liger": {**LEVERS, "loss_chunk_size": 1024, **LIGER},
    "offload": {**LEVERS, "gradient_checkpointing": "offload"},
    "offload+chunked_ce": {**LEVERS, **OFFLOAD_CHUNKED},
    "offload+chunked_ce+cpu_embed": {**LEVERS, **OFFLOAD_CHUNKED, "cpu_embeddings": True},
    "lean_lora": {**LEVERS, "lean_forward": True},
    # LoRA dropout 0, as Unsloth runs (the baseline keeps 0.05): no dropped copy of each adapter's
    # input.
    "nodrop": {**LEVERS, "lora_dropout": 0.0},
    # The leanest measured path (benchmarks/results/2026-11-28_session4), lean LoRA forward
    # included.
    "offload+chunked_ce+cpu_embed+nodrop": LEANEST,
    # Optimizers that spare the step its waits for the GPU (qlora_lightning.speed.optim):
    # bitsandbytes' 8-bit AdamW without its synchronize per tensor (the step's non-finite check
    # still waits once), and torch's fused AdamW (one kernel for every adapter tensor, skips a
    # non-finite step on the GPU; its fp32 state, 8 bytes per adapter parameter, is counted).
    "adamw8bit": {**LEVERS, "optimizer": "adamw_8bit"},
    "fused_adamw": {**LEVERS, "optimizer": "fused_adamw"},
    "offload+chunked_ce+cpu_embed+nodrop+adamw8bit": {**LEANEST, "optimizer": "adamw_8bit"},
    "offload+chunked_ce+cpu_embed+nodrop+fused_adamw": {**LEANEST, "optimizer": "fused_adamw"},
    # The same with the embedding table on the GPU: no host lookup and copy per step (Mistral-7B at
    # 8x1024: 0.30 GiB more, no faster; benchmarks/results/2026-11-29_session7).
    "offload+chunked_ce+nodrop+fused_adamw": {
        **LEANEST,
        "optimizer": "fused_adamw",
        "cpu_embeddings": False,
    },
    # One compiled graph per decoder layer instead of one per part (on the fastest path at 8x1024:
    # +0.2%, noise).
    "layer_compile": {**LEVERS, "compile_scope": "layer"},
    "offload+chunked_ce+cpu_embed+nodrop+fused_adamw+layer_compile": {
        **LEANEST,
        "optimizer": "fused_adamw",
        "compile_scope": "layer",
    },
    # Each layer's last projection recomputed too (lora.skip_last_recompute off; on by default since
    # the 8x1024 measurements of 2026-11-29), and the fastest path with PEFT's own LoRA forward.
    "recompute_last": {**LEVERS, "skip_last_recompute": False},
    "offload+chunked_ce+cpu_embed+nodrop+fused_adamw+recompute_last": {
        **LEANEST,
        "optimizer": "fused_adamw",
        "skip_last_recompute": False,
    },
    "offload+chunked_ce+cpu_embed+nodrop+fused_adamw+peft_forward": {
        **LEANEST,
        "optimizer": "fused_adamw",
        "lean_forward": False,
    },
    "offload_all+chunked_ce+cpu_embed+nodrop+adamw8bit": SMALL_BATCH,
    # Attention and MLP checkpointed apart: o_proj's base matmul is not recomputed either.
    "offload_halves+chunked_ce+cpu_embed+nodrop+fused_adamw": {
        **LEANEST,
        "optimizer": "fused_adamw",
        "gradient_checkpointing": "offload_halves",
    },
    # The same with the embedding table on the GPU (0.24 GiB more for Mistral-7B and Llama-2-7B): no
    # lookup on the host, whose speed is the likeliest cause of Llama-2's slow rounds
    # (2026-11-29_session13).
    "offload_halves+chunked_ce+nodrop+fused_adamw": {
        **LEANEST,
        "optimizer": "fused_adamw",
        "gradient_checkpointing": "offload_halves",
        "cpu_embeddings": False,
    },
    # The fastest 8x1024 path without the qlora_lightning.FreezeHeap callback every config lists: a
    # full garbage collection that lands in a step walks every object of the run (0.35-0.52 s on
    # Mistral-7B).
    "offload_halves+chunked_ce+cpu_embed+nodrop+fused_adamw+thawed_heap": {
        **LEANEST,
        "optimizer": "fused_adamw",
        "gradient_checkpointing": "offload_halves",
        "freeze_heap": False,
    },
    # The 4-bit matmuls through bitsandbytes' operator and addmm throughout
    # (lora.compiled_dequant_tokens: 0), or in the compiled graph up to 512 tokens per matmul only
    # (the default until 2026-11-29; now any number).
    "offload+chunked_ce+cpu_embed+nodrop+fused_adamw+bnb_dequant": {
        **LEANEST,
        "optimizer": "fused_adamw",
        "compiled_dequant_tokens": 0,
    },
    "offload+chunked_ce+cpu_embed+nodrop+fused_adamw+dequant512": {
        **LEANEST,
        "optimizer": "fused_adamw",
        "compiled_dequant_tokens": 512,
    },
    "offload_all+chunked_ce+cpu_embed+nodrop+adamw8bit+bnb_dequant": {
        **SMALL_BATCH,
        "compiled_dequant_tokens": 0,
    },
    "offload+chunked_ce+flex": {
        **LEVERS,
        **OFFLOAD_CHUNKED,
        "attn_implementation": "flex_attention",
    },
    "offload+chunked_ce+flex+bnb_dequant": {
        **LEVERS,
        **OFFLOAD_CHUNKED,
        "attn_implementation": "flex_attention",
        "compiled_dequant_tokens": 0,
    },
    "offload+chunked_ce+flex+recompute_last": {
        **LEVERS,
        **OFFLOAD_CHUNKED,
        "attn_implementation": "flex_attention",
        "skip_last_recompute": False,
    },
    # The leanest path with flex attention (long sequences: no dense sliding-window mask).
    "offload+chunked_ce+cpu_embed+nodrop+fused_adamw+flex": {
        **LEANEST,
        "optimizer": "fused_adamw",
        "attn_implementation": "flex_attention",
    },
    "lean": {**LEVERS, **OFFLOAD_CHUNKED, **LIGER},
    "lean+flex": {**LEVERS, **OFFLOAD_CHUNKED, **LIGER, "attn_implementation": "flex_attention"},
    "no_gc": {**LEVERS, "gradient_checkpointing": False},
    "no_gc+chunked_ce+liger": {
        **LEVERS,
        "gradient_checkpointing": False,
        "loss_chunk_size": 1024,
        **LIGER,
    },
}
# The ``optimizer`` lever's class, as the memory estimator names it.
ESTIMATED_OPTIMIZER = {
    "paged_adamw_8bit": "PagedAdamW8bit",
    "adamw_8bit": "AdamW8bit",
    "fused_adamw": "AdamW",
}
BASELINE = "hf_peft"
PEER = "unsloth"  # measured when installed, in a process of its own like every job

# What each name in a variant means, for the report.
MEANINGS = {
    BASELINE: "plain transformers + PEFT loop (the baseline)",
    PEER: "Unsloth's `FastLanguageModel` in the same loop, LoRA dropout 0 (no estimate)",
    "default": "this project's Lightning path with its defaults (bf16 embeddings, head and norms)",
    "upcast": "`base.upcast_frozen: true` (PEFT's fp32 upcast)",
    "offload": "`gradient_checkpointing: offload`",
    "offload_all": "`gradient_checkpointing: offload_all`",
    "offload_halves": "`gradient_checkpointing: offload_halves`",
    "chunked_ce": "`model.loss_chunk_size: 1024`",
    "liger": "`base.liger_kernel: true` (run eagerly)",
    "lean": "offload + chunked_ce + liger",
    "+flex": "`base.attn_implementation: flex_attention`",
    "cpu_embed": "`base.cpu_embeddings: true`",
    "nodrop": "`lora.dropout: 0` (the others and the baseline: 0.05)",
    "lean_lora": "`lora.lean_forward: true`",
    "fused_adamw": "`torch.optim.AdamW` with `fused: true` instead of paged 8-bit AdamW",
    "adamw8bit": "`qlora_lightning.speed.optim.AdamW8bit` (not paged, no synchronize per tensor)",
    "layer_compile": "`base.compile_scope: layer`",
    "recompute_last": "`lora.skip_last_recompute: false`",
    "peft_forward": "`lora.lean_forward: false`",
    "bnb_dequant` / `dequant512": "`lora.compiled_dequant_tokens` 0 / 512 (default: no limit)",
    "eager": "`base.compile_layers: false` (on a GPU the default compiles each layer's parts)",
    "no_gc": "`gradient_checkpointing: false`",
    "thawed_heap": "without the `qlora_lightning.FreezeHeap` callback (every other project job has "
    "it, as the configs do)",
}
LEGEND = "impl: " + "; ".join(f"`{name}` = {meaning}" for name, meaning in MEANINGS.items()) + "."
