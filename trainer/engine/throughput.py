"""Model FLOPs per token and utilisation (MFU), counted the standard way.

Training FLOPs per token = 6 x non-embedding parameters (forward 2, backward 4 per multiply-add)
                         + 12 x layers x width x sequence length (attention scores and weighted sums)
                         + 6 x head parameters x the fraction of positions the head actually runs on
(1.0 for a dense head, the masked fraction for trainer.mlm's sparse head). Where trainer.mlm also runs the last
layer's queries, attention and feed-forward on the masked rows, those parameters and that layer's attention term
count for the same fraction. MFU = achieved FLOP/s / peak, with the
peak the device's datasheet dense figure for the precision in use (`DATASHEET_PEAK_TFLOPS`), `--peak_tflops` when
given, and only for a device the table does not know (a CPU) the mean rate of large matrix products measured there.
The dense-equivalent MFU counts what the same tokens would cost with every position through the head and the last
layer (`training_flops_per_token` with its defaults), the figure other trainers report.
"""
from __future__ import annotations

import re
import time
from dataclasses import dataclass
from typing import Callable, Optional

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


@dataclass(frozen=True)
class Throughput:
    """The MFU of a logging window: FLOPs per token at a sequence length as the task computes them (`flops_per_token`)
    and densely (`dense_flops_per_token`: every position through every layer and the head, what other trainers
    count), against `peak_flops` per process (rank 0 only; None elsewhere: no MFU logged)."""

    flops_per_token: Callable[[float], float]
    dense_flops_per_token: Callable[[float], float]
    peak_flops: Optional[float]

    def mfu(self, tokens: float, seconds: float, samples: float, world_size: int) -> dict:
        if not self.peak_flops or not samples:
            return {}
        rate, length, peak = tokens / seconds, tokens / samples, self.peak_flops * world_size
        return {"mfu": rate * self.flops_per_token(length) / peak,
                "mfu_dense_equivalent": rate * self.dense_flops_per_token(length) / peak}


# Dense (no 2:4 sparsity) tensor-core peaks from NVIDIA's datasheets and architecture whitepapers, in TFLOP/s, with
# FP32 accumulation for the 16-bit formats (what PyTorch's matrix products use). "tf32" is an fp32 run with TF32
# matrix products allowed (trainer.distributed.launch allows them on GPUs); "fp32" the plain CUDA-core rate. Each entry:
# (name pattern, compute capability, peaks). The first pattern that matches the device name wins, so the more
# specific names come first. A device whose capability differs from its entry's is treated as unknown.
DATASHEET_PEAK_TFLOPS = (
    (r"H100.*PCIe", (9, 0), {"bf16": 756.5, "fp16": 756.5, "tf32": 378.0, "fp32": 51.0}),
    (r"H100.*NVL|H200.*NVL", (9, 0), {"bf16": 835.5, "fp16": 835.5, "tf32": 417.5, "fp32": 60.0}),
    (r"H100|H200|GH200", (9, 0), {"bf16": 989.5, "fp16": 989.5, "tf32": 494.5, "fp32": 67.0}),  # SXM
    (r"A100", (8, 0), {"bf16": 312.0, "fp16": 312.0, "tf32": 156.0, "fp32": 19.5}),  # 40 and 80 GB, SXM and PCIe
    (r"L40S", (8, 9), {"bf16": 362.0, "fp16": 362.0, "tf32": 183.0, "fp32": 91.6}),
    (r"\bL4\b", (8, 9), {"bf16": 121.0, "fp16": 121.0, "tf32": 60.0, "fp32": 30.3}),
    # NVIDIA publishes no separate A10G datasheet; these are the A10's (the same GA102 part and tensor-core count).
    (r"\bA10G?\b", (8, 6), {"bf16": 125.0, "fp16": 125.0, "tf32": 62.5, "fp32": 31.2}),
    (r"V100S", (7, 0), {"fp16": 130.0, "fp32": 16.4}),  # Volta: no bf16, no tf32 tensor cores
    (r"V100.*PCIE", (7, 0), {"fp16": 112.0, "fp32": 14.0}),
    (r"V100", (7, 0), {"fp16": 125.0, "fp32": 15.7}),  # SXM2
    (r"RTX 4090", (8, 9), {"bf16": 165.2, "fp16": 165.2, "tf32": 82.6, "fp32": 82.6}),
    (r"RTX 3090", (8, 6), {"bf16": 71.0, "fp16": 71.0, "tf32": 35.6, "fp32": 35.6}),
)


@dataclass(frozen=True)
class Peak:
    flops: float  # FLOP/s
    source: str  # for the log: which figure MFU is measured against


def precision_name(bf16: bool, fp16: bool, tf32: bool) -> str:
    return "bf16" if bf16 else "fp16" if fp16 else "tf32" if tf32 else "fp32"


def datasheet_peak(device_name: str, capability: tuple[int, int], precision: str) -> Optional[float]:
    """The datasheet dense peak (FLOP/s) of a CUDA device for `precision`; None for a device or precision the
    table does not know."""
    for pattern, expected_capability, peaks in DATASHEET_PEAK_TFLOPS:
        if re.search(pattern, device_name, flags=re.IGNORECASE):
            if tuple(capability) != expected_capability or precision not in peaks:
                return None
            return peaks[precision] * 1e12
    return None


def device_peak(device: torch.device, precision: str, override_tflops: Optional[float] = None) -> Peak:
    """The peak MFU divides by: --peak_tflops, else the datasheet figure, else (unknown device) a measured rate."""
    if override_tflops:
        return Peak(override_tflops * 1e12, f"{override_tflops:g} TFLOP/s given by --peak_tflops")
    if device.type == "cuda":
        name, capability = torch.cuda.get_device_name(device), torch.cuda.get_device_capability(device)
        flops = datasheet_peak(name, capability, precision)
        if flops is not None:
            return Peak(flops, f"{flops / 1e12:g} TFLOP/s, the {name} datasheet dense {precision} peak")
    else:
        name = f"{device.type} ({torch.get_num_threads()} threads)"
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)
    flops = measure_matmul_peak(device, dtype)
    return Peak(flops, f"{flops / 1e12:.3g} TFLOP/s, the mean {precision} matrix-product rate measured on {name}, "
                       f"which has no datasheet entry here (set --peak_tflops to use another figure)")


def measure_matmul_peak(device: torch.device, dtype: torch.dtype, size: Optional[int] = None,
                        repeats: Optional[int] = None) -> float:
    """Mean FLOP/s of `repeats` size x size matrix products after a warm-up, the device synchronised at the clock
    points: the ceiling for a device without a datasheet figure. Large products (8192 on a GPU, where one 2048
    product ran at a third to a half of the 8192 rate; on a CPU the size `cpu_product_size` finds, 2048 for fp32 on
    this project's CPU) so that the figure is the device's rate, not launch overhead. The operands come from a
    generator of their own: this runs on the first process only, and drawing from the global one would leave the
    ranks' random streams apart."""
    on_gpu = device.type == "cuda"
    repeats = repeats or (10 if on_gpu else 3)
    generator = torch.Generator(device=device).manual_seed(0)
    size = size or (8192 if on_gpu else cpu_product_size(dtype, generator))
    a, b = (torch.randn(size, size, device=device, dtype=dtype, generator=generator) for _ in range(2))

    def synchronize():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    a @ b  # warm-up: library initialisation, kernel selection
    synchronize()
    started = time.perf_counter()
    for _ in range(repeats):
        a @ b
    synchronize()
    return 2.0 * size ** 3 * repeats / (time.perf_counter() - started)


def cpu_product_size(dtype: torch.dtype, generator: torch.Generator, seconds: float = 0.1,
                     largest: int = 2048) -> int:
    """The smallest CPU matrix size from 256 up (doubling, at most `largest`) whose product takes `seconds`: long
    enough to time the rate, not the call. A fixed 2048 would cost every run without a datasheet figure minutes on a
    CPU without bfloat16 units (one 2048 bf16 product took 86 s on this project's CPU; 512 took 0.3 s)."""
    size = 256
    while size < largest:
        a, b = (torch.randn(size, size, dtype=dtype, generator=generator) for _ in range(2))
        started = time.perf_counter()
        a @ b
        if time.perf_counter() - started >= seconds:
            break
        size *= 2
    return size
