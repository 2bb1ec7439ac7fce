"""Bad configs fail while the config is parsed, in one line that names the key."""

import pytest

from qlora_lightning.run.cli import main

BASE = ["fit", "--config", "configs/quickstart.yaml"]


@pytest.mark.parametrize(
    "args, key",
    [
        (["--model.init_args.bogus", "1"], "bogus"),
        (["--data.init_args.batch_size", "two"], "data.batch_size"),
        (["--model.init_args.lora.r", "0"], "model.lora.r"),
        (["--model.init_args.lora.r=-4"], "model.lora.r"),
        (["--model.init_args.lora.dropout", "1.5"], "model.lora.dropout"),
        (["--model.init_args.optimizer.init_args.lr", "0"], "lr"),
        (["--model.init_args.optimizer.init_args.lr=-1e-4"], "lr"),
        (["--data.init_args.max_seq_length", "4"], "data.max_seq_length"),
        (["--data.init_args.val_fraction", "1.0"], "data.val_fraction"),
        (["--model.init_args.base.quantization", "nf3"], "model.base.quantization"),
        (["--trainer.max_stepz", "3"], "max_stepz"),
        (["--model.init_args.warmup_ratio", "1.5"], "model.warmup_ratio"),
        (
            ["--model.init_args.gradient_checkpointing", "sometimes"],
            "model.gradient_checkpointing: expected bool or 'offload'",
        ),
        (["--config", "configs/dpo_quickstart.yaml", "--model.init_args.beta", "0"], "model.beta"),
        (
            ["--config", "configs/dpo_quickstart.yaml", "--model.init_args.label_smoothing", "0.5"],
            "model.label_smoothing",
        ),
    ],
)
def test_bad_config_fails_at_parse_time_naming_the_key(args, key, monkeypatch):
    # Parse-time: nothing may be built, so building the model would be a failure here.
    monkeypatch.setattr(
        "qlora_lightning.model.build.build_model", lambda *a, **k: pytest.fail("model was built")
    )
    monkeypatch.chdir(__import__("tests.conftest", fromlist=["REPO"]).REPO)
    with pytest.raises(SystemExit) as exit_info:
        main(BASE + args)
    message = str(exit_info.value.code)
    assert message.startswith("error: ") and "\n" not in message
    assert key in message
