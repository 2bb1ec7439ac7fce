"""Model FLOPs behind MFU: what PerfMonitor and the benchmarks count per trained token."""

from transformers import Gemma2Config, LlamaConfig, MistralConfig

from qlora_lightning.run.callbacks import attended_positions, train_flops_per_token


def test_a_token_attends_to_the_sequence_or_at_most_the_sliding_window():
    assert attended_positions(LlamaConfig(num_hidden_layers=4), 32768) == 32768
    mistral = MistralConfig(num_hidden_layers=4, sliding_window=4096)
    assert attended_positions(mistral, 32768) == 4096  # every layer slides
    assert attended_positions(mistral, 1024) == 1024  # the window is wider than the sequence
    # Sliding and full layers alternate.
    gemma2 = Gemma2Config(num_hidden_layers=4, sliding_window=4096)
    assert sorted(set(gemma2.layer_types)) == ["full_attention", "sliding_attention"]
    assert attended_positions(gemma2, 32768) == (4096 + 32768) / 2


def test_flops_per_token_are_four_per_weight_plus_attention_over_its_span():
    # 4N (forward 2N, backward 2N: frozen weights get no weight gradient) + 12 x layers x span x
    # width.
    assert train_flops_per_token(1000, n_layers=2, attn_dim=8, span=16) == 4000 + 12 * 2 * 16 * 8
    mistral = MistralConfig(num_hidden_layers=2, sliding_window=4096)
    long, window = (
        train_flops_per_token(1000, 2, 8, attended_positions(mistral, t)) for t in (32768, 4096)
    )
    assert long == window  # beyond the window, no more work per token
