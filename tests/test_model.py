"""The model builder on the CPU with real bitsandbytes 4-bit layers: what is quantized, what
trains, adapter round trips through the PEFT format, adapter-only checkpoints, bad model ids."""

from __future__ import annotations

import dataclasses

import bitsandbytes as bnb
import pytest
import torch
import transformers
from lightning.pytorch import seed_everything
from peft import PeftModel
from transformers.models.llama.modeling_llama import LlamaMLP

from qlora_lightning import GSM8KDataModule
from qlora_lightning.errors import UserError
from qlora_lightning.model.build import (
    BaseModelSpec,
    LoraSpec,
    build_model,
    load_base_model,
    load_tokenizer,
)
from qlora_lightning.model.plan import should_compile
from qlora_lightning.speed import checkpointing
from qlora_lightning.speed.checkpointing import OffloadToCpu
from tests.conftest import EXAMPLES, TINY_LLAMA, cpu_trainer, sft_module, tiny_spec, tokenizer_at

# Every linear layer 64 wide or wider in multiples of 64 (k/v made 64 wide), as bitsandbytes' CPU
# kernels prefer; the logits comparisons below run without gradients in eval mode.
WIDE_KV = {"num_key_value_heads": 4}
DECODER_LINEARS = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def _token_batch(n_rows: int = 2, length: int = 24, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 512, (n_rows, length), generator=torch.Generator().manual_seed(seed))


def test_base_linears_are_4bit_and_only_lora_trains():
    model = build_model(tiny_spec(), LoraSpec(r=4, dropout=0.0), gradient_checkpointing=False)
    config = model.config
    quantized = {name: m for name, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    assert {name.split(".")[-2] for name in quantized} == DECODER_LINEARS  # "...q_proj.base_layer"
    assert len(quantized) == len(DECODER_LINEARS) * config.num_hidden_layers
    for layer in quantized.values():
        weight = layer.weight
        assert weight.quant_state.quant_type == "nf4"
        # Packed: 4 bits per weight, whatever dtype the storage is viewed as.
        assert weight.numel() * weight.element_size() * 2 == layer.in_features * layer.out_features
        assert not weight.requires_grad
    # The output head stays a plain (frozen) Linear: quantizing it costs quality for little memory.
    assert type(model.get_output_embeddings()) is torch.nn.Linear

    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert not any(".lora_" in n for n in frozen)
    # Two LoRA factors on every quantized layer.
    assert len(trainable) == 2 * len(quantized)


def test_lora_sees_gradients_through_every_layer():
    """Each adapter factor gets a non-zero gradient (with lora_B made non-zero, so A's is too)."""
    model = build_model(tiny_spec(), LoraSpec(r=4, dropout=0.0), gradient_checkpointing=False)
    torch.manual_seed(0)
    for name, p in model.named_parameters():
        if ".lora_B." in name:
            torch.nn.init.normal_(p, std=0.02)  # PEFT starts B at zero, which zeroes A's gradient
    tokens = _token_batch()
    model(input_ids=tokens, labels=tokens).loss.backward()
    missing = [
        n
        for n, p in model.named_parameters()
        if p.requires_grad and (p.grad is None or not p.grad.any())
    ]
    assert not missing


def test_saved_adapter_reloads_onto_a_fresh_4bit_base_with_the_same_logits(tmp_path):
    spec = tiny_spec(**WIDE_KV)
    model = build_model(spec, LoraSpec(r=8, dropout=0.0), gradient_checkpointing=False)
    torch.manual_seed(0)
    for p in model.parameters():
        if p.requires_grad:
            # A non-trivial adapter: fresh LoRA is a no-op (B = 0)
            torch.nn.init.normal_(p, std=0.1)
    model.save_pretrained(tmp_path / "adapter")
    tokens = _token_batch()
    model.eval()
    with torch.no_grad():
        trained = model(input_ids=tokens).logits

    base = load_base_model(spec)
    with torch.no_grad():
        base_only = base(input_ids=tokens).logits
    reloaded = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    with torch.no_grad():
        again = reloaded(input_ids=tokens).logits

    assert (trained - base_only).abs().max() > 1e-2  # the adapter changes the output...
    torch.testing.assert_close(again, trained, rtol=0, atol=1e-5)  # ...and survives the round trip


def _fit_one_step(spec, tmp_path, name: str) -> tuple[dict, int, int]:
    """Train one step of q/v LoRA on ``spec`` and save a Lightning checkpoint.

    Returns the checkpoint, its size in bytes and the base model's size in bytes.
    """
    seed_everything(0)
    module = sft_module(base=spec, r=8, target_modules=["q_proj", "v_proj"])
    data = GSM8KDataModule(
        path=str(EXAMPLES / "gsm8k_train.jsonl"),
        tokenizer=tokenizer_at(TINY_LLAMA),
        num_samples=2,
        batch_size=2,
    )
    trainer = cpu_trainer(tmp_path / name, max_steps=1, limit_val_batches=0)
    trainer.fit(module, datamodule=data)
    path = tmp_path / f"{name}.ckpt"
    trainer.save_checkpoint(path)
    return (
        torch.load(path, weights_only=False),
        path.stat().st_size,
        module.model.get_memory_footprint(),
    )


def test_checkpoint_holds_the_adapter_and_its_optimizer_state_only(tmp_path):
    small = tiny_spec()
    # A much bigger base (16x the MLP, 16x the vocabulary) under the same q/v adapter shapes.
    big = tiny_spec(intermediate_size=2048, vocab_size=8192)
    ckpt_small, bytes_small, base_small = _fit_one_step(small, tmp_path, "small")
    ckpt_big, bytes_big, base_big = _fit_one_step(big, tmp_path, "big")

    assert base_big > 10 * base_small
    for ckpt in (ckpt_small, ckpt_big):
        keys = set(ckpt["state_dict"])
        assert keys and all(".lora_A." in k or ".lora_B." in k for k in keys)
        assert {k.split(".")[-4] for k in keys} == {"q_proj", "v_proj"}
        # AdamW keeps state for exactly the trainable tensors.
        assert len(ckpt["optimizer_states"][0]["state"]) == len(keys)
    shapes = lambda ckpt: {k: tuple(v.shape) for k, v in ckpt["state_dict"].items()}  # noqa: E731
    assert shapes(ckpt_small) == shapes(ckpt_big)
    # Same adapter, same bytes (to a few KiB of metadata), however big the base.
    assert abs(bytes_big - bytes_small) < 4096
    assert bytes_big < base_big / 20


@pytest.mark.parametrize("checkpointing", [False, True, "offload", "offload_halves", "offload_all"])
def test_gradient_checkpointing_recomputes_under_the_trainer(checkpointing, monkeypatch, tmp_path):
    """With checkpointing on, each decoder layer runs again in the backward pass (``offload_all``:
    once, with what it saves going through the offload hooks).

    Hugging Face layers checkpoint only in training mode; ``from_pretrained`` returns eval mode and
    Lightning keeps module modes, so this fails unless the builder switches to training mode.
    """
    calls, offloaded = [], []
    forward, pack = LlamaMLP.forward, OffloadToCpu.pack
    monkeypatch.setattr(LlamaMLP, "forward", lambda self, x: calls.append(1) or forward(self, x))
    monkeypatch.setattr(
        OffloadToCpu,
        "pack",
        staticmethod(lambda t, **kw: offloaded.append(t.dim()) or pack(t, **kw)),
    )
    module = sft_module(gradient_checkpointing=checkpointing)
    data = GSM8KDataModule(
        path=str(EXAMPLES / "gsm8k_train.jsonl"),
        tokenizer=tokenizer_at(TINY_LLAMA),
        num_samples=2,
        batch_size=2,
    )
    cpu_trainer(tmp_path, max_steps=1, limit_val_batches=0).fit(module, datamodule=data)
    layers = module.model.config.num_hidden_layers
    assert len(calls) == layers * (2 if checkpointing in (True, "offload", "offload_halves") else 1)
    # Each layer's (B, T, H) input goes through the offload hooks under `offload`, and the residual
    # stream between attention and MLP too under `offload_halves`; under `offload_all`, every tensor
    # its layers save.
    if checkpointing == "offload_all":
        assert offloaded.count(3) > 4 * layers, offloaded
    else:
        assert offloaded.count(3) == {"offload": layers, "offload_halves": 2 * layers}.get(
            checkpointing, 0
        )


@pytest.mark.parametrize("budget", ["none", "ample", "between", "tiny"])
def test_auto_checkpointing_builds_the_fastest_mode_the_memory_budget_allows(
    budget, monkeypatch, tmp_path, caplog
):
    calls = []
    forward = LlamaMLP.forward
    monkeypatch.setattr(LlamaMLP, "forward", lambda self, x: calls.append(1) or forward(self, x))
    data = GSM8KDataModule(
        path=str(EXAMPLES / "gsm8k_train.jsonl"),
        tokenizer=tokenizer_at(TINY_LLAMA),
        num_samples=2,
        batch_size=2,
        max_seq_length=256,
    )
    module = sft_module(gradient_checkpointing="auto")
    trainer = cpu_trainer(tmp_path, max_steps=1, limit_val_batches=0)
    # The estimate reads the micro-batch shape off the trainer's DataModule.
    module._trainer = trainer
    trainer.datamodule = data
    peak = {
        mode: module.plan_training(estimate=True, gradient_checkpointing=mode).peak_gib
        for mode in (False, "offload_all", True, "offload")
    }
    # 2 x 256 tokens: offload_all is a candidate.
    assert peak[False] > peak["offload_all"] >= peak["offload"], peak
    module.memory_budget_gib, expected = {
        "none": (None, False),  # on a CPU without a budget nothing is checkpointed
        "ample": (100.0, False),
        "between": ((peak[False] + peak["offload_all"]) / 2, "offload_all"),
        "tiny": (peak["offload"] / 2, "offload"),  # nothing fits: the leanest, with a warning
    }[budget]
    module._trainer = None
    with caplog.at_level("INFO", logger="qlora_lightning.modules.base"):
        trainer.fit(module, datamodule=data)
    assert module.plan.checkpointing.value == expected
    layers = module.model.config.num_hidden_layers
    assert len(calls) == layers * (2 if expected in (True, "offload") else 1)
    assert ("no mode fits" in caplog.text) == (budget == "tiny")


def _lora_grads(
    checkpointing, tokens: torch.Tensor, device: str = "cpu", spec: BaseModelSpec = None
) -> dict[str, torch.Tensor]:
    """The adapter's gradients of one loss on ``tokens``, from the same seeded (non-zero)
    adapter."""
    torch.manual_seed(0)  # lora_A's initialization
    model = build_model(
        spec or tiny_spec(),
        LoraSpec(r=4, dropout=0.0),
        gradient_checkpointing=checkpointing,
        device=device,
    )
    generator = torch.Generator().manual_seed(1)
    for name, p in model.named_parameters():
        if ".lora_B." in name:
            p.data.copy_(torch.randn(p.shape, generator=generator) * 0.05)
    with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
        model(input_ids=tokens.to(device), labels=tokens.to(device)).loss.backward()
    return {n: p.grad.float().cpu() for n, p in model.named_parameters() if p.requires_grad}


def test_offloaded_checkpointing_saves_only_each_layers_input_and_keeps_the_gradients(monkeypatch):
    """``offload`` moves exactly one (B, T, H) tensor per decoder layer out of the device; the
    gradients equal those without checkpointing."""
    packed = []
    pack = OffloadToCpu.pack
    monkeypatch.setattr(
        OffloadToCpu,
        "pack",
        staticmethod(lambda t, **kw: packed.append(tuple(t.shape)) or pack(t, **kw)),
    )
    tokens = _token_batch(n_rows=2, length=24)
    plain = _lora_grads(False, tokens)
    assert not packed
    offloaded = _lora_grads("offload", tokens)
    layers = 2  # the shipped tiny Llama
    # (0,) is checkpoint's marker.
    assert [s for s in packed if s != (0,)] == [(2, 24, 64)] * layers, packed
    assert plain.keys() == offloaded.keys()
    for name in plain:
        torch.testing.assert_close(offloaded[name], plain[name], rtol=1e-5, atol=1e-7, msg=name)


def _compiled_parts(model: torch.nn.Module) -> list[bool]:
    """For each child of each decoder layer: whether it runs through torch.compile."""
    return [
        part._compiled_call_impl is not None
        for layer in model.base_model.model.model.layers
        for part in layer.children()
    ]


@pytest.mark.slow
@pytest.mark.parametrize("scope", ["parts", "layer"])
def test_compiled_layers_give_the_gradients_of_eager_ones(one_thread, scope):
    """``compile_layers`` compiles attention, MLP and norms of every layer (or each whole layer),
    inside the offloaded checkpoint, and the adapter's gradients stay those of the eager model."""
    tokens = _token_batch(n_rows=2, length=24)
    spec = dataclasses.replace(tiny_spec(), compile_layers=True, compile_scope=scope)
    compiled = _lora_grads("offload", tokens, spec=spec)
    eager = _lora_grads("offload", tokens, spec=dataclasses.replace(spec, compile_layers=False))
    assert compiled.keys() == eager.keys()
    for name in eager:
        torch.testing.assert_close(compiled[name], eager[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("setting, compiled", [(True, True), ("auto", False), (False, False)])
def test_layers_compile_when_asked_and_auto_only_on_a_gpu(setting, compiled):
    model = build_model(
        dataclasses.replace(tiny_spec(), compile_layers=setting),
        LoraSpec(r=4),
        gradient_checkpointing=False,
    )
    parts = _compiled_parts(model)
    assert len(parts) == 2 * 4  # the tiny Llama: 2 layers of attention, MLP and two norms
    assert parts == [compiled] * len(parts)


def test_whole_layers_compile_with_compile_scope_layer():
    model = build_model(
        dataclasses.replace(tiny_spec(), compile_layers=True, compile_scope="layer"),
        LoraSpec(r=4),
        gradient_checkpointing=False,
    )
    layers = model.base_model.model.model.layers
    assert [layer._compiled_call_impl is not None for layer in layers] == [True, True]
    assert _compiled_parts(model) == [False] * 2 * 4


def test_offload_halves_compiles_the_parts_it_calls_whatever_the_scope():
    model = build_model(
        dataclasses.replace(tiny_spec(), compile_layers=True, compile_scope="layer"),
        LoraSpec(r=4),
        gradient_checkpointing="offload_halves",
    )
    layers = model.base_model.model.model.layers
    assert [layer._compiled_call_impl is not None for layer in layers] == [False, False]
    assert _compiled_parts(model) == [True] * 2 * 4


def test_cpu_embeddings_keep_the_table_off_the_device_and_change_nothing_else():
    tokens = _token_batch(n_rows=2, length=24)
    spec = tiny_spec()
    on_device = _lora_grads(True, tokens, spec=spec)
    on_cpu = _lora_grads(True, tokens, spec=dataclasses.replace(spec, cpu_embeddings=True))
    assert on_cpu.keys() == on_device.keys()
    for name in on_device:
        torch.testing.assert_close(on_cpu[name], on_device[name], rtol=0, atol=0, msg=name)

    model = build_model(
        dataclasses.replace(spec, cpu_embeddings=True), LoraSpec(r=4), gradient_checkpointing=False
    )
    embedding = model.get_input_embeddings()
    assert not any("embed_tokens" in name for name, _ in model.named_parameters())
    table = embedding.table
    model.to(torch.float64)  # as a device or dtype move would: the table stays, the rows follow
    assert embedding.table is table and table.dtype == torch.float32
    assert embedding(tokens).dtype == torch.float64


def test_cpu_embeddings_look_up_the_host_copy_of_the_batch_ids():
    model = build_model(
        dataclasses.replace(tiny_spec(), cpu_embeddings=True),
        LoraSpec(r=4),
        gradient_checkpointing=False,
    )
    embedding = model.get_input_embeddings()
    ids, other = _token_batch(n_rows=2, length=8), _token_batch(n_rows=2, length=8) + 1
    # Stands in for the batch moved to a GPU: the forward on that tensor reads the host copy given.
    embedding.remember_host_copy(ids, other)
    assert torch.equal(embedding(ids), embedding.table[other])
    # Any other tensor: its own ids.
    assert torch.equal(embedding(ids.clone()), embedding.table[ids])


def test_cpu_embeddings_fit_and_save_the_adapter(tmp_path):
    module = sft_module(base=dataclasses.replace(tiny_spec(), cpu_embeddings=True))
    module.adapter_dir = str(tmp_path / "adapter")
    data = GSM8KDataModule(
        path=str(EXAMPLES / "gsm8k_train.jsonl"),
        tokenizer=tokenizer_at(TINY_LLAMA),
        num_samples=4,
        batch_size=2,
    )
    cpu_trainer(tmp_path, max_steps=2, limit_val_batches=1).fit(module, datamodule=data)
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()


def test_cpu_embeddings_refuse_a_table_tied_to_the_output_head():
    spec = dataclasses.replace(tiny_spec(tie_word_embeddings=True), cpu_embeddings=True)
    with pytest.raises(UserError, match="ties its input embedding to the output head"):
        build_model(spec, LoraSpec(r=4), gradient_checkpointing=False)


def test_cpu_embeddings_refuse_gemma_for_its_tied_table_not_its_scaled_embedding():
    from transformers import GemmaConfig, GemmaForCausalLM

    from qlora_lightning.model.build import embeddings_to_cpu

    model = GemmaForCausalLM(
        GemmaConfig(
            vocab_size=128,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=32,
        )
    )
    with pytest.raises(UserError, match="gemma ties its input embedding to the output head"):
        embeddings_to_cpu(model)


@pytest.mark.gpu
def test_cpu_embeddings_free_the_table_on_the_gpu_with_the_same_logits():
    spec = dataclasses.replace(tiny_spec(vocab_size=32000), compute_dtype="bfloat16")
    tokens = _token_batch(n_rows=2, length=64).cuda()
    held, logits = {}, {}
    for cpu in (False, True):
        torch.manual_seed(0)
        before = torch.cuda.memory_allocated()
        model = build_model(
            dataclasses.replace(spec, cpu_embeddings=cpu),
            LoraSpec(r=4),
            gradient_checkpointing=False,
            device="cuda",
        ).eval()
        held[cpu] = torch.cuda.memory_allocated() - before
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
            logits[cpu] = model(input_ids=tokens).logits.float().cpu()
        del model
    assert held[False] - held[True] >= 32000 * 64 * 2  # the bf16 table
    torch.testing.assert_close(logits[True], logits[False], rtol=0, atol=0)


def test_auto_compiles_on_a_gpu_only_where_triton_and_a_c_compiler_are(monkeypatch, caplog):
    from qlora_lightning.model import plan as model_module

    monkeypatch.setattr(model_module.importlib.util, "find_spec", lambda name: object())
    monkeypatch.setattr(model_module.shutil, "which", lambda name: f"/usr/bin/{name}")
    assert should_compile("auto", "cuda:0") and not should_compile("auto", "cpu")
    assert should_compile(True, "cpu") and not should_compile(False, "cuda")
    monkeypatch.setattr(model_module.shutil, "which", lambda name: None)
    assert not should_compile("auto", "cuda:0")
    assert "running eagerly, a C compiler (cc, gcc or clang) not found" in caplog.text


@pytest.mark.parametrize("upcast", [False, True])
def test_frozen_16bit_weights_stay_in_the_compute_dtype_unless_upcast(upcast):
    spec = dataclasses.replace(tiny_spec(), compute_dtype="bfloat16", upcast_frozen=upcast)
    model = build_model(spec, LoraSpec(r=4), gradient_checkpointing=False)
    expected = torch.float32 if upcast else torch.bfloat16
    frozen16 = {
        n: p.dtype
        for n, p in model.named_parameters()
        if not p.requires_grad and type(p).__name__ != "Params4bit"
    }
    assert any("embed_tokens" in n for n in frozen16) and any("norm" in n for n in frozen16)
    assert set(frozen16.values()) == {expected}, frozen16
    # The adapter trains in fp32 either way.
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.float32}


@pytest.mark.gpu
def test_offloaded_checkpointing_frees_the_layer_inputs_on_the_gpu_with_the_same_gradients():
    # Eager layers: compiled ones round differently from one compilation to the next (see below).
    spec = dataclasses.replace(
        tiny_spec(
            hidden_size=512,
            intermediate_size=1024,
            num_hidden_layers=8,
            num_attention_heads=8,
            num_key_value_heads=8,
        ),
        compute_dtype="bfloat16",
        compile_layers=False,
    )
    tokens = _token_batch(n_rows=4, length=1024).cuda()
    held, grads = {}, {}
    for mode in (True, "offload"):
        torch.manual_seed(0)
        model = build_model(
            spec, LoraSpec(r=4, dropout=0.0), gradient_checkpointing=mode, device="cuda"
        )
        with torch.autocast("cuda", dtype=torch.bfloat16):
            before = torch.cuda.memory_allocated()
            loss = model(input_ids=tokens, labels=tokens).loss
            # A block copied out on the side stream is freed once its copy is done, which the
            # allocator notices at its next allocation. (Not empty_cache: it also drops cuBLAS's
            # workspaces, after which the same backward can round differently.)
            torch.cuda.synchronize()
            torch.empty(1, device="cuda")
            # What the forward leaves for the backward.
            held[mode] = torch.cuda.memory_allocated() - before
        loss.backward()
        grads[mode] = {
            n: p.grad.float().cpu() for n, p in model.named_parameters() if p.requires_grad
        }
        del model, loss
    for name in grads[True]:
        torch.testing.assert_close(
            grads["offload"][name], grads[True][name], rtol=0, atol=0, msg=name
        )
    # The bf16 inputs of layers 1-7 (4 x 1024 x 512 x 2 bytes = 4 MiB each) leave the GPU; layer 0's
    # input is the embedding output, which the model's forward still holds. (Measured with the side
    # stream: 27.9 MiB less; some kilobytes of small saved tensors stay.)
    assert held[True] - held["offload"] >= 7 * 4 * 2**20 * 0.95, held


@pytest.mark.gpu
def test_offload_all_keeps_no_activation_on_the_gpu_and_the_gradients_of_plain_training(
    monkeypatch,
):
    """``offload_all`` recomputes nothing, and what the forward leaves on the GPU for the backward
    is smaller than even checkpointing's layer inputs; the gradients are those of plain training.

    Eager layers: compiled ones round differently from one compilation to the next (on an H200,
    two plain compiled runs differed by 0.8% of a gradient's largest entry, and both offload_all and
    plain checkpointing by 2.6%, the same figure), while eager offload_all matched plain training
    bit for bit there. Eager attention too: flash attention's backward adds the query gradient up
    with atomics, in an order that changes from run to run (the test failed once, and passed when
    rerun on the same machine)."""
    spec = dataclasses.replace(
        tiny_spec(
            hidden_size=512,
            intermediate_size=1024,
            num_hidden_layers=8,
            num_attention_heads=8,
            num_key_value_heads=8,
        ),
        compute_dtype="bfloat16",
        compile_layers=False,
        attn_implementation="eager",
    )
    tokens = _token_batch(n_rows=4, length=1024).cuda()
    # Every saved tensor, the adapter's small (tokens x r) ones too: what stays is then the loss's
    # alone.
    monkeypatch.setattr(checkpointing, "MIN_OFFLOAD_BYTES", 0)
    held, grads = {}, {}
    for mode in (False, True, "offload_all"):
        torch.manual_seed(0)
        model = build_model(
            spec, LoraSpec(r=4, dropout=0.0), gradient_checkpointing=mode, device="cuda"
        )
        with torch.autocast("cuda", dtype=torch.bfloat16):
            before = torch.cuda.memory_allocated()
            loss = model(input_ids=tokens, labels=tokens).loss
            torch.cuda.synchronize()  # as in the test above: blocks copied out are freed ...
            torch.empty(1, device="cuda")  # ... at the allocator's next allocation
            held[mode] = torch.cuda.memory_allocated() - before
        loss.backward()
        grads[mode] = {
            n: p.grad.float().cpu() for n, p in model.named_parameters() if p.requires_grad
        }
        del model, loss
    for name in grads[False]:
        torch.testing.assert_close(
            grads["offload_all"][name], grads[False][name], rtol=0, atol=0, msg=name
        )
    # The logits (4 x 1024 x 512 vocab, bf16 and fp32) stay for the loss's backward in every mode;
    # checkpointing also keeps 8 layer inputs of 4 MiB each on the GPU, offload_all none of them.
    assert held["offload_all"] < held[True] - 7 * 4 * 2**20 * 0.95, held
    assert held["offload_all"] < held[False] / 4, held


@pytest.mark.parametrize("random_init", [False, True])
def test_unknown_model_id_is_one_line_naming_it(random_init):
    spec = BaseModelSpec(name_or_path="nobody-xyz/no-such-model", random_init=random_init)
    with pytest.raises(UserError) as err:
        load_base_model(spec)
    message = str(err.value)
    assert "nobody-xyz/no-such-model" in message and "\n" not in message


def test_unknown_tokenizer_id_is_one_line_naming_it():
    with pytest.raises(UserError) as err:
        load_tokenizer("nobody-xyz/no-such-tokenizer")
    assert "nobody-xyz/no-such-tokenizer" in str(err.value) and "\n" not in str(err.value)


def test_bad_lora_target_is_one_line_naming_it():
    with pytest.raises(UserError) as err:
        build_model(
            tiny_spec(),
            LoraSpec(r=4, target_modules=["no_such_proj"]),
            gradient_checkpointing=False,
        )
    assert "no_such_proj" in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_offloading_hooks_run_eagerly_from_compiled_layer_norms(device, tmp_path, monkeypatch):
    """Phi's ``nn.LayerNorm``, compiled, saves its tensors from inside compiled code: the compiler
    then traced the offloading hook as a frame of its own, and on a GPU failed on its
    ``record_stream``."""
    config = transformers.PhiConfig(
        vocab_size=512,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,
        partial_rotary_factor=0.5,
    )
    torch.manual_seed(0)
    transformers.PhiForCausalLM(config).save_pretrained(tmp_path)
    traced = []
    worth_offloading = checkpointing._worth_offloading
    monkeypatch.setattr(
        checkpointing,
        "_worth_offloading",
        lambda *args: traced.append(torch.compiler.is_compiling()) or worth_offloading(*args),
    )
    torch._dynamo.reset()
    spec = BaseModelSpec(name_or_path=str(tmp_path), compute_dtype="bfloat16", compile_layers=True)
    model = build_model(
        spec,
        LoraSpec(r=4, dropout=0.0, lean_forward=True),
        gradient_checkpointing="offload_all",
        device=device,
    )
    tokens = torch.randint(3, 512, (1, 64), generator=torch.Generator().manual_seed(0)).to(device)
    with torch.autocast(device, dtype=torch.bfloat16):
        loss = model(input_ids=tokens, labels=tokens).loss
    loss.backward()
    assert traced and not any(traced)


def test_offload_halves_splits_llama_style_layers_and_says_which_it_checkpoints_whole(caplog):
    def checkpoint_funcs(model):
        with caplog.at_level("WARNING", logger="qlora_lightning.speed.checkpointing"):
            checkpointing.enable_checkpointing(model, "offload_halves")
        return {
            getattr(layer._gradient_checkpointing_func, "func", layer._gradient_checkpointing_func)
            for layer in model.model.layers
        }

    small = {
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "vocab_size": 128,
    }
    llama = transformers.LlamaForCausalLM(transformers.LlamaConfig(**small))
    assert checkpoint_funcs(llama) == {checkpointing.offloaded_halves}
    assert not caplog.text
    # Attention and MLP side by side.
    phi = transformers.PhiForCausalLM(transformers.PhiConfig(**small))
    assert checkpoint_funcs(phi) == {checkpointing.offloaded_checkpoint}
    assert "PhiDecoderLayer not split" in caplog.text
