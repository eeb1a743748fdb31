import pytest
import torch
from transformers import BertConfig, BertForMaskedLM

from trainer.engine.throughput import (cpu_product_size, datasheet_peak, device_peak, measure_matmul_peak,
                                      precision_name, split_parameter_counts, training_flops_per_token)
from trainer.models.sparse_mlm import last_layer_row_parameters


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


def test_measured_peak_is_a_plausible_rate_and_leaves_the_random_stream_alone():
    """Only the first process measures: the others' random streams would be behind if it drew from the global one."""
    torch.manual_seed(7)
    expected = torch.rand(3)
    torch.manual_seed(7)
    peak = measure_matmul_peak(torch.device("cpu"), torch.float32, size=256, repeats=2)
    assert 1e8 < peak < 1e14
    assert torch.equal(torch.rand(3), expected)


def test_a_cpu_product_is_timed_at_the_smallest_size_that_takes_long_enough():
    generator = torch.Generator().manual_seed(0)
    assert cpu_product_size(torch.float32, generator, seconds=0.0) == 256  # the first product is long enough
    assert cpu_product_size(torch.float32, generator, seconds=float("inf"), largest=1024) == 1024  # never: the cap


@pytest.mark.parametrize("name, capability, precision, tflops", [
    ("NVIDIA H100 80GB HBM3", (9, 0), "bf16", 989.5),  # SXM
    ("NVIDIA H100 PCIe", (9, 0), "bf16", 756.5),
    ("NVIDIA H100 NVL", (9, 0), "fp16", 835.5),
    ("NVIDIA H200", (9, 0), "tf32", 494.5),
    ("NVIDIA A100-SXM4-80GB", (8, 0), "bf16", 312.0),
    ("NVIDIA A100-PCIE-40GB", (8, 0), "tf32", 156.0),
    ("NVIDIA L40S", (8, 9), "bf16", 362.0),
    ("NVIDIA L4", (8, 9), "fp32", 30.3),
    ("NVIDIA A10G", (8, 6), "bf16", 125.0),
    ("Tesla V100-SXM2-16GB", (7, 0), "fp16", 125.0),
    ("Tesla V100-PCIE-32GB", (7, 0), "fp16", 112.0),
    ("NVIDIA GeForce RTX 4090", (8, 9), "bf16", 165.2),
    ("NVIDIA GeForce RTX 3090", (8, 6), "tf32", 35.6),
])
def test_datasheet_peak_by_device_name_and_precision(name, capability, precision, tflops):
    assert datasheet_peak(name, capability, precision) == pytest.approx(tflops * 1e12)


@pytest.mark.parametrize("name, capability, precision", [
    ("Tesla V100-SXM2-16GB", (7, 0), "bf16"),  # Volta has no bf16 tensor cores
    ("NVIDIA H100 80GB HBM3", (8, 0), "bf16"),  # a name that does not fit its capability
    ("NVIDIA B200", (10, 0), "bf16"),  # not in the table
    ("NVIDIA L40", (8, 9), "bf16"),  # L40 is not L40S, nor L4
])
def test_unknown_devices_and_precisions_have_no_datasheet_peak(name, capability, precision):
    assert datasheet_peak(name, capability, precision) is None


def test_precision_choice():
    assert [precision_name(True, False, True), precision_name(False, True, True), precision_name(False, False, True),
            precision_name(False, False, False)] == ["bf16", "fp16", "tf32", "fp32"]


def test_override_wins_and_a_cpu_peak_is_measured_and_says_so():
    given = device_peak(torch.device("cpu"), "bf16", override_tflops=12.5)
    assert given.flops == 12.5e12 and "--peak_tflops" in given.source
    measured = device_peak(torch.device("cpu"), "fp32")
    assert 1e8 < measured.flops < 1e14 and "measured" in measured.source


def test_dense_equivalent_counts_every_position_through_head_and_last_layer():
    """The engine logs train_mfu_dense_equivalent with the model's dense count: the same tokens through a dense head
    and last layer cost exactly the masked-rows saving more."""
    config = BertConfig(vocab_size=1000, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=256, max_position_embeddings=64)
    model = BertForMaskedLM(config)
    body, head = split_parameter_counts(model)
    rows = last_layer_row_parameters(model)
    sparse = training_flops_per_token(model, 32, 0.15, rows)
    dense = training_flops_per_token(model, 32)
    assert dense == 6 * body + 2 * 12 * 64 * 32 + 6 * head
    assert dense - sparse == pytest.approx(0.85 * (6 * head + 6 * rows + 12 * 64 * 32))
