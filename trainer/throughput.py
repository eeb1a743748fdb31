"""Model FLOPs per token and utilisation (MFU), counted the standard way.

Training FLOPs per token = 6 x non-embedding parameters (forward 2, backward 4 per multiply-add)
                         + 12 x layers x width x sequence length (attention scores and weighted sums)
                         + 6 x head parameters x the fraction of positions the head actually runs on
(1.0 for a dense head, the masked fraction for trainer.mlm's sparse head). Where trainer.mlm also runs the last
layer's queries, attention and feed-forward on the masked rows, those parameters and that layer's attention term
count for the same fraction. MFU = achieved FLOP/s / peak, with the
peak given by the user or measured as the best rate of a large matrix product on the device.
"""
from __future__ import annotations

import time

import torch


def split_parameter_counts(hf_model) -> tuple[int, int]:
    """(body parameters without embeddings or the output head, output-head parameters)."""
    embeddings = {id(p) for module in hf_model.modules() if isinstance(module, torch.nn.Embedding)
                  for p in module.parameters()}
    output = hf_model.get_output_embeddings()
    head_ids = set()
    if output is not None:
        head_module = next((m for name, m in hf_model.named_children() if name in ("cls", "lm_head")), None)
        for p in (head_module.parameters() if head_module is not None else output.parameters()):
            head_ids.add(id(p))
    body = sum(p.numel() for p in hf_model.parameters() if id(p) not in embeddings and id(p) not in head_ids)
    # A tied decoder shares the embedding matrix: count it for the head, where it is multiplied.
    head = sum(p.numel() for p in hf_model.parameters() if id(p) in head_ids and id(p) not in embeddings)
    if output is not None and id(output.weight) in embeddings:
        head += output.weight.numel()
    return body, head


def training_flops_per_token(hf_model, seq_len: int, head_fraction: float = 1.0,
                             masked_rows_layer_parameters: int = 0) -> float:
    """masked_rows_layer_parameters: those of the last layer that run on the head's fraction of positions only."""
    config = hf_model.config
    layers = getattr(config, "num_hidden_layers", None) or getattr(config, "n_layers")
    width = getattr(config, "hidden_size", None) or getattr(config, "dim")
    body, head = split_parameter_counts(hf_model)
    attention_per_layer = 12.0 * width * seq_len
    flops = 6.0 * body + layers * attention_per_layer + 6.0 * head * head_fraction
    if masked_rows_layer_parameters:
        flops -= (1.0 - head_fraction) * (6.0 * masked_rows_layer_parameters + attention_per_layer)
    return flops


def measure_matmul_peak(device: torch.device, dtype: torch.dtype, size: int = 2048, repeats: int = 5) -> float:
    """Best FLOP/s of a size x size matrix product: the ceiling MFU is measured against when none is given."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    best = float("inf")
    for _ in range(repeats + 1):
        if device.type == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - started)
    return 2.0 * size ** 3 / best
