"""DDP and FSDP through Lightning's strategies, on the CPU: two processes over gloo, a tiny 4-bit
Llama.

One ``torchrun --nproc-per-node 2 tests/distributed_worker.py`` launch fits every run (SFT and
DPO under both strategies, bf16 storage under both, an FSDP resume) and the tests read what the
ranks wrote. FSDP runs as ``configs/mistral_fsdp.yaml`` configures it; Lightning allows FSDP on
GPUs only, so the worker uses its FSDPStrategy through a subclass that names the CPU device.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from jsonargparse import ArgumentParser
from lightning.fabric.plugins.environments import LightningEnvironment
from lightning.pytorch.plugins.precision import FSDPPrecision
from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy, Strategy
from safetensors.torch import load_file
from torch.distributed.fsdp import MixedPrecision

from qlora_lightning.errors import UserError
from qlora_lightning.model.build import LoraSpec, build_model
from qlora_lightning.model.distributed import (
    DecoderLayerPolicy,
    cast_frozen_for_fsdp,
    check_fsdp_precision,
)
from qlora_lightning.modules import DPOModule
from qlora_lightning.run.callbacks import peak_memory_metrics
from tests.conftest import REPO, sft_module, tiny_spec
from tests.distributed_worker import ADAM_LR, FSDP_CONFIG, PROBE, STEPS

RUNS = [
    "ddp_sft",
    "fsdp_sft",
    "ddp_dpo",
    "fsdp_dpo",
    "ddp_sft_bf16",
    "fsdp_sft_bf16",
    "fsdp_sft_resume",
    "ddp_sft_compiled",
    "ddp_dpo_compiled",
    "fsdp_sft_chunked",
    "fsdp_dpo_chunked",
    "fsdp_sft_replicated",
    "fsdp_dpo_replicated",
    "fsdp_sft_replicated_resume",
    "ddp_sft_resumelate",
]
LAYERS, LORA_MATRICES = 2, 28  # the tiny Llama: 2 decoder layers x 7 linear layers x (A, B)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """The output folder of one two-process launch that fits every run in ``RUNS``."""
    out = tmp_path_factory.mktemp("distributed")
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
        str(REPO / "tests" / "distributed_worker.py"),
        "--out",
        str(out),
        "--runs",
        *RUNS,
    ]
    # OMP threads: one per rank (two ranks share two cores); QLORA_CACHE: conftest's session cache.
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=400)
    if result.returncode != 0:
        pytest.fail(
            f"torchrun exited {result.returncode}:\n{(result.stdout + result.stderr)[-6000:]}"
        )
    return out


def _rank(runs: Path, run: str, rank: int) -> dict:
    return torch.load(runs / run / f"rank{rank}.pt")


def _peft_key(name: str) -> str:
    """A LoRA parameter's key in adapter_model.safetensors: its name without the adapter's."""
    return name.replace(".default.", ".")


def _assert_within(
    a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], bound: float, scale: str
) -> None:
    """Every tensor of ``a`` within ``bound`` of ``b``'s; the message names the worst one and its
    distance."""
    assert a.keys() == b.keys()
    worst = max(a, key=lambda name: (a[name] - b[name]).abs().max().item())
    distance = (a[worst] - b[worst]).abs().max().item()
    assert distance <= bound, (
        f"largest difference {distance:.3g} in {worst} exceeds {bound:.3g} ({scale})"
    )


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float = 0.0) -> None:
    assert a.keys() == b.keys()
    for name in a:
        # Keeps the numbers.
        torch.testing.assert_close(
            a[name], b[name], atol=atol, rtol=0.0, msg=lambda detail, name=name: f"{name}: {detail}"
        )


# ---- the runs -------------------------------------------------------------------------


@pytest.mark.parametrize("run", RUNS)
def test_both_ranks_end_with_the_adapter_that_fit_saved_once(runs, run):
    rank0, rank1 = _rank(runs, run, 0), _rank(runs, run, 1)
    adapter = rank0["adapter"]
    assert len(adapter) == LORA_MATRICES
    _assert_same(adapter, rank1["adapter"])

    # The PEFT file holds exactly these tensors (under FSDP: gathered, not one rank's shard).
    saved = load_file(runs / run / "adapter" / "adapter_model.safetensors")
    _assert_same(saved, {_peft_key(name): value for name, value in adapter.items()})
    # Trained: LoRA's B starts at zero, and a DPO policy starts at the SFT adapter.
    start = (
        load_file(runs / "ddp_sft" / "adapter" / "adapter_model.safetensors")
        if "dpo" in run
        else {key: torch.zeros_like(value) for key, value in saved.items() if ".lora_B." in key}
    )
    assert all(not torch.equal(saved[key], value) for key, value in start.items()), (
        "the adapter did not train"
    )

    # The last checkpoint keeps the adapter alone, whole, under the LightningModule's names.
    checkpoint = torch.load(runs / run / "last.ckpt", weights_only=False)
    _assert_same(
        checkpoint["state_dict"], {f"model.{name}": value for name, value in adapter.items()}
    )


@pytest.mark.parametrize("task", ["sft", "dpo"])
def test_compiled_layers_train_the_adapter_eager_ones_train_under_ddp(runs, task):
    # DPO switches adapters between the policy and the reference forward: the compiled parts follow.
    compiled, eager = _rank(runs, f"ddp_{task}_compiled", 0), _rank(runs, f"ddp_{task}", 0)
    # Attention, MLP, 2 norms.
    assert (compiled["compiled_modules"], eager["compiled_modules"]) == (
        LAYERS * 4,
        0,
    )
    # Compiled kernels sum in another order. Adam turns a rounding-sized change of a near-zero
    # gradient into a step of up to lr on that weight, so the bound is a fraction of the largest
    # move training makes (about lr per step): measured 1.2e-4 and 1.37e-4 (0.3% of it) on 2 cores.
    largest_move = ADAM_LR * STEPS
    _assert_within(
        compiled["adapter"], eager["adapter"], bound=0.01 * largest_move, scale="1% of lr x steps"
    )
    # The logits inherit it: within 0.1% of their own spread (measured up to 1.2e-4 = 0.007%).
    spread = eager["logits"].std().item()
    _assert_within(
        {"logits": compiled["logits"]},
        {"logits": eager["logits"]},
        bound=1e-3 * spread,
        scale=f"0.1% of the logits' std {spread:.3g}",
    )


@pytest.mark.parametrize("task", ["sft", "dpo"])
def test_chunked_loss_under_fsdp_trains_the_adapter_the_plain_loss_trains(runs, task):
    # The chunked loss applies the head outside the model's forward, within the root unit's.
    chunked, plain = _rank(runs, f"fsdp_{task}_chunked", 0), _rank(runs, f"fsdp_{task}", 0)
    # Equal up to the rounding of a sum in chunks (measured up to 1.4e-5, weights up to 0.15).
    _assert_same(chunked["adapter"], plain["adapter"], atol=3e-5)


@pytest.mark.parametrize("run", ["sft", "dpo", "sft_bf16"])
def test_fsdp_trains_the_adapter_ddp_trains(runs, run):
    fsdp, ddp = _rank(runs, f"fsdp_{run}", 0), _rank(runs, f"ddp_{run}", 0)
    # Gradient clipping (fp32 runs) takes the norm over the shards in another order: equal to
    # rounding.
    _assert_same(fsdp["adapter"], ddp["adapter"], atol=1e-5)
    torch.testing.assert_close(fsdp["logits"], ddp["logits"], atol=1e-4, rtol=0.0)
    # Different tokens on the two ranks: the test below can tell a sum from a multiple.
    assert fsdp["tokens"] == ddp["tokens"] != _rank(runs, f"ddp_{run}", 1)["tokens"]


@pytest.mark.parametrize("task", ["sft", "dpo"])
def test_fsdp_with_replicated_adapters_trains_the_adapter_ddp_trains_in_fewer_units(runs, task):
    replicated, ddp = _rank(runs, f"fsdp_{task}_replicated", 0), _rank(runs, f"ddp_{task}", 0)
    _assert_same(replicated["adapter"], ddp["adapter"], atol=1e-5)
    torch.testing.assert_close(replicated["logits"], ddp["logits"], atol=1e-4, rtol=0.0)
    # The root and the decoder layers only: no FSDP unit (and no collective) per LoRA matrix.
    assert replicated["wrappers"] == {
        "FullyShardedDataParallel": 1 + LAYERS,
        "CheckpointWrapper": LAYERS,
    }


def test_fsdp_with_replicated_adapters_resumes_exactly(runs):
    resumed, straight = (
        _rank(runs, "fsdp_sft_replicated_resume", 0),
        _rank(runs, "fsdp_sft_replicated", 0),
    )
    assert resumed["tokens"] == straight["tokens"][1:]
    _assert_same(resumed["adapter"], straight["adapter"], atol=1e-7)


def test_fsdp_wraps_layers_and_adapters_and_checkpoints_the_layers(runs):
    fsdp, ddp = _rank(runs, "fsdp_sft", 0), _rank(runs, "ddp_sft", 0)
    # The root, each decoder layer and each LoRA matrix; FSDP's checkpointing on each layer only.
    assert fsdp["wrappers"] == {
        "FullyShardedDataParallel": 1 + LAYERS + LORA_MATRICES,
        "CheckpointWrapper": LAYERS,
    }
    # ... in place of transformers' checkpointing, which the same module turns on under DDP.
    assert not fsdp["hf_checkpointing"] and ddp["hf_checkpointing"]
    assert ddp["wrappers"] == {"FullyShardedDataParallel": 0, "CheckpointWrapper": 0}


@pytest.mark.parametrize("run", ["fsdp_sft", "fsdp_sft_bf16"])
def test_fsdp_adapter_loads_on_one_device_with_the_logits_of_two(runs, run, one_thread):
    base = tiny_spec(initializer_range=0.2)  # as the worker builds it
    if run.endswith("bf16"):
        base = dataclasses.replace(base, compute_dtype="bfloat16")
    model = build_model(
        base, LoraSpec(init_adapter=str(runs / run / "adapter")), gradient_checkpointing=False
    )
    with torch.no_grad():
        logits = model.eval()(input_ids=PROBE, attention_mask=torch.ones_like(PROBE)).logits
    torch.testing.assert_close(logits, _rank(runs, run, 0)["logits"], atol=1e-5, rtol=0.0)


@pytest.mark.parametrize("run", ["ddp_sft", "fsdp_sft", "fsdp_dpo"])
def test_perf_monitor_counts_the_tokens_of_every_rank(runs, run):
    steps = json.loads((runs / run / "perf.json").read_text())
    rank0, rank1 = _rank(runs, run, 0)["tokens"], _rank(runs, run, 1)["tokens"]
    measured = list(zip(rank0, rank1))[1:]  # warmup_steps=1
    assert len(steps) == len(measured) == 3
    for step, (tokens0, tokens1) in zip(steps, measured):
        tokens = step["perf/tokens_per_sec"] * step["perf/step_time_s"]
        assert tokens == pytest.approx(tokens0 + tokens1, rel=1e-9)
        assert "perf/peak_alloc_gib_rank0" not in step  # CPU: no GPU memory to report
    summary = json.loads((runs / run / "run_summary.json").read_text())
    assert summary["world_size"] == 2
    assert summary["peak_alloc_gib_per_rank"] == "not measured (CPU run)"


def test_ddp_resumes_exactly_inside_a_later_epoch(runs):
    # Stopped after step 3, inside the second epoch: the resumed steps see that epoch's own order
    # (Lightning's distributed sampler wrapper draws it before any set_epoch, so the loader must
    # start in the restored epoch), and both ranks end with the uninterrupted run's adapter.
    for rank in (0, 1):
        resumed, straight = _rank(runs, "ddp_sft_resumelate", rank), _rank(runs, "ddp_sft", rank)
        assert resumed["tokens"] == straight["tokens"][3:]
        _assert_same(resumed["adapter"], straight["adapter"], atol=1e-7)


def test_fsdp_resumes_from_its_checkpoint_exactly(runs):
    # Stopped after step 1 and resumed from last.ckpt: the adapter and AdamW's moments come back.
    resumed, straight = _rank(runs, "fsdp_sft_resume", 0), _rank(runs, "fsdp_sft", 0)
    # The second fit ran steps 2 to 4, on the same data.
    assert resumed["tokens"] == straight["tokens"][1:]
    _assert_same(resumed["adapter"], straight["adapter"], atol=1e-7)


# ---- the pieces, in one process ---------------------------------------------------------


def _walk(policy: DecoderLayerPolicy, model: torch.nn.Module) -> list[str]:
    """The modules ``policy`` selects, asked in the order FSDP asks (a module before its
    children)."""
    modules = list(model.named_modules())
    for _, module in modules:
        policy(module, recurse=True, nonwrapped_numel=0)
    return [name for name, module in modules if policy(module, recurse=False, nonwrapped_numel=0)]


def test_decoder_layer_policy_finds_the_layers_and_the_adapters(one_thread):
    model = build_model(tiny_spec(), LoraSpec(r=8), gradient_checkpointing=False)
    wrapped = _walk(DecoderLayerPolicy(), model)
    layers = [name for name in wrapped if name.endswith(("layers.0", "layers.1"))]
    assert len(layers) == LAYERS and len(wrapped) == LAYERS + LORA_MATRICES
    assert all(
        ".lora_A.default" in name or ".lora_B.default" in name
        for name in set(wrapped) - set(layers)
    )
    assert _walk(DecoderLayerPolicy(adapters=False), model) == layers
    # No transformers model.
    assert _walk(DecoderLayerPolicy(), torch.nn.Linear(64, 64).requires_grad_(False)) == []


def test_cast_frozen_for_fsdp_gives_each_layer_one_dtype(one_thread):
    base = dataclasses.replace(tiny_spec(), compute_dtype="bfloat16", upcast_frozen=True)
    model = build_model(base, LoraSpec(r=8), gradient_checkpointing=False)
    layer = model.base_model.model.model.layers[0]

    def frozen_dtypes(module) -> set[torch.dtype]:
        return {p.dtype for p in module.parameters() if not p.requires_grad}

    assert frozen_dtypes(layer) == {torch.bfloat16, torch.float32}  # 4-bit storage, upcast norms
    cast_frozen_for_fsdp(model, torch.bfloat16)
    assert frozen_dtypes(layer) == {torch.bfloat16}
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {
        torch.float32
    }  # adapters untouched
    # Outside the layers nothing changes: the residual stream stays fp32, as on one device.
    assert frozen_dtypes(model.base_model.model.model.embed_tokens) == {torch.float32}
    assert frozen_dtypes(model.base_model.model.lm_head) == {torch.float32}


def test_fsdp_precision_that_would_convert_the_packed_weights_is_refused():
    def strategy(precision: str, mixed_precision=None) -> FSDPStrategy:
        fsdp = FSDPStrategy(mixed_precision=mixed_precision)
        fsdp.precision_plugin = FSDPPrecision(precision)
        return fsdp

    check_fsdp_precision(strategy("bf16-mixed", MixedPrecision()), "bf16-mixed", torch.bfloat16)
    # Casts bf16 to bf16: nothing.
    check_fsdp_precision(strategy("bf16-mixed"), "bf16-mixed", torch.bfloat16)
    with pytest.raises(UserError, match="32-true casts every weight"):
        check_fsdp_precision(strategy("32-true", MixedPrecision()), "32-true", torch.bfloat16)
    with pytest.raises(UserError, match="casts parameters to torch.bfloat16"):
        check_fsdp_precision(strategy("bf16-mixed"), "bf16-mixed", torch.float32)


class _Stop(Exception):
    pass


def test_each_rank_loads_the_base_onto_its_own_gpu(monkeypatch):
    # Rank 1 of a DDP job on two GPUs: configure_model must map the whole model to cuda:1.
    monkeypatch.setenv("LOCAL_RANK", "1")
    strategy = DDPStrategy(
        parallel_devices=[torch.device("cuda", 0), torch.device("cuda", 1)],
        cluster_environment=LightningEnvironment(),
    )
    seen = {}

    def from_pretrained(path, **kwargs):
        seen.update(kwargs)
        raise _Stop

    monkeypatch.setattr(
        "qlora_lightning.model.build.AutoModelForCausalLM.from_pretrained", from_pretrained
    )
    module = sft_module(base=dataclasses.replace(tiny_spec(), random_init=False))
    module._trainer = SimpleNamespace(strategy=strategy)
    with pytest.raises(_Stop):
        module.configure_model()
    assert seen["device_map"] == {"": "cuda:1"}


def test_peak_memory_is_reported_per_rank():
    metrics = peak_memory_metrics(torch.tensor([10.0, 12.0]), torch.tensor([11.0, 13.0]))
    assert metrics == {
        "perf/peak_alloc_gib": 12.0,
        "perf/peak_reserved_gib": 13.0,
        "perf/peak_alloc_gib_rank0": 10.0,
        "perf/peak_reserved_gib_rank0": 11.0,
        "perf/peak_alloc_gib_rank1": 12.0,
        "perf/peak_reserved_gib_rank1": 13.0,
    }
    assert peak_memory_metrics(torch.tensor([10.0]), torch.tensor([11.0])) == {
        "perf/peak_alloc_gib": 10.0,
        "perf/peak_reserved_gib": 11.0,
    }  # one GPU: the names it always had


def test_dpo_refuses_precomputed_reference_under_fsdp():
    module = DPOModule(base=tiny_spec(), precompute_ref_logps=True)
    module._trainer = SimpleNamespace(strategy=FSDPStrategy())
    with pytest.raises(UserError, match="precompute_ref_logps does not work under FSDP"):
        module.on_fit_start()


def test_cpu_embeddings_are_refused_under_fsdp():
    module = sft_module(base=dataclasses.replace(tiny_spec(), cpu_embeddings=True))
    module._trainer = SimpleNamespace(
        strategy=FSDPStrategy(parallel_devices=[torch.device("cuda", 0)]), precision="bf16-mixed"
    )
    with pytest.raises(UserError, match="cpu_embeddings does not work under FSDP"):
        module.configure_model()


@pytest.mark.parametrize("setting", [True, "auto"])
def test_compiled_layers_are_refused_or_left_out_under_fsdp(setting, monkeypatch):
    built = {}

    def build_model(base, lora, plan, *args, **kwargs):
        built["plan"] = plan
        return torch.nn.Linear(64, 64)

    monkeypatch.setattr("qlora_lightning.modules.building.build_model", build_model)
    module = sft_module(base=dataclasses.replace(tiny_spec(), compile_layers=setting))
    strategy = FSDPStrategy(parallel_devices=[torch.device("cuda", 0)])
    module._trainer = SimpleNamespace(strategy=strategy, precision="bf16-mixed")
    if setting is True:
        with pytest.raises(UserError, match="compile_layers does not work under FSDP"):
            module.configure_model()
    else:
        module.configure_model()
        assert built["plan"].compile is False


def test_fsdp_config_builds_lightnings_fsdp_strategy():
    # What the CLI builds from the YAML (tests/test_configs.py cannot: Lightning wants a GPU for
    # it).
    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--strategy", type=Strategy)
    section = yaml.safe_load(FSDP_CONFIG.read_text())["trainer"]["strategy"]
    strategy = parser.instantiate_classes(parser.parse_object({"strategy": section})).strategy
    assert type(strategy) is FSDPStrategy
    assert isinstance(strategy.kwargs["auto_wrap_policy"], DecoderLayerPolicy)
    assert strategy.kwargs["auto_wrap_policy"].adapters
    checkpointing = strategy._activation_checkpointing_kwargs["auto_wrap_policy"]
    assert isinstance(checkpointing, DecoderLayerPolicy) and not checkpointing.adapters
    # Adapters train beside frozen weights in one unit's views.
    assert strategy.kwargs["use_orig_params"]
    # Autocast only: no parameter or buffer casts.
    assert strategy.mixed_precision == MixedPrecision()
    assert strategy._state_dict_type == "full"
