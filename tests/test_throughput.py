import pytest
import torch
from transformers import BertConfig, BertForMaskedLM

from trainer.sparse_mlm import last_layer_row_parameters
from trainer.throughput import measure_matmul_peak, split_parameter_counts, training_flops_per_token


def test_flops_count_body_attention_and_head_as_computed():
    config = BertConfig(vocab_size=1000, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=256, max_position_embeddings=64)
    model = BertForMaskedLM(config)
    body, head = split_parameter_counts(model)
    per_layer = 4 * (64 * 64 + 64) + 2 * 64 + (64 * 256 + 256) + (256 * 64 + 64) + 2 * 64
    embedding_norm = 2 * 64
    assert body == 2 * per_layer + embedding_norm
    assert head == (64 * 64 + 64) + 2 * 64 + 1000 * 64 + 1000  # transform, its norm, tied decoder, bias
    dense = training_flops_per_token(model, seq_len=32)
    assert dense == 6 * body + 12 * 2 * 64 * 32 + 6 * head
    assert training_flops_per_token(model, 32, head_fraction=0.15) == dense - 6 * head * 0.85
    # trainer.mlm's sparse last layer: keys and values everywhere, queries/attention/feed-forward on 15%
    last_layer_rows = per_layer - 2 * (64 * 64 + 64)
    assert last_layer_row_parameters(model) == last_layer_rows
    assert training_flops_per_token(model, 32, 0.15, last_layer_rows) == pytest.approx(
        dense - 6 * head * 0.85 - 0.85 * (6 * last_layer_rows + 12 * 64 * 32))


def test_measured_peak_is_a_plausible_rate():
    peak = measure_matmul_peak(torch.device("cpu"), torch.float32, size=256, repeats=2)
    assert 1e8 < peak < 1e14
