"""--optim's memory: the bytes of optimizer state per parameter, torchao's 8-bit and 4-bit AdamW against torch's
AdamW, on a small Llama after one step, and the time of a step once compiled.

State bytes are counted tensor by tensor: a quantized moment (torchao's OptimState8bit / OptimState4bit) by the
tensors it is made of (codes, block scales, code book), through its `__tensor_flatten__`. Usage:
python bench/optimizer_state.py [--steps 3]
"""
from __future__ import annotations

import argparse
import time

import torch

from harness import small_llama

from trainer.engine.optim import OPTIMIZERS, OptimizationArguments, parameter_groups

SHAPE = dict(layers=4, hidden=256, vocab=8000, block=128, batch=4)
VARIANTS = ["adamw_torch", "adamw_torch_8bit", "adamw_torch_4bit"]


def tensor_bytes(tensor: torch.Tensor) -> int:
    if hasattr(tensor, "__tensor_flatten__"):  # a tensor subclass: the plain tensors it holds
        names, _ = tensor.__tensor_flatten__()
        return sum(tensor_bytes(getattr(tensor, name)) for name in names)
    return tensor.numel() * tensor.element_size()


def measure(optim: str, steps: int) -> dict:
    model = small_llama(SHAPE["layers"], SHAPE["hidden"], SHAPE["vocab"], positions=SHAPE["block"])
    optimization = OptimizationArguments(optim=optim, learning_rate=1e-4)
    optimizer = OPTIMIZERS[optim](parameter_groups(model, 0.01), optimization)
    ids = torch.randint(0, SHAPE["vocab"], (SHAPE["batch"], SHAPE["block"]))
    seconds = []
    for _ in range(steps + 1):  # the first step allocates the state (and compiles torchao's update)
        model(ids, labels=ids, use_cache=False).loss.backward()
        start = time.perf_counter()
        optimizer.step()
        seconds.append(time.perf_counter() - start)
        optimizer.zero_grad(set_to_none=True)
    state = sum(tensor_bytes(value) for per_parameter in optimizer.state.values() for value in per_parameter.values()
                if isinstance(value, torch.Tensor))
    parameters = sum(p.numel() for p in model.parameters())
    return {"state_bytes": state, "bytes_per_parameter": state / parameters, "parameters": parameters,
            "step_seconds": sum(seconds[1:]) / steps, "first_step_seconds": seconds[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3, help="Timed optimizer steps after the first.")
    args = parser.parse_args()
    results = {optim: measure(optim, args.steps) for optim in VARIANTS}
    base = results["adamw_torch"]
    print(f"{results['adamw_torch']['parameters']:,} parameters")
    for optim, result in results.items():
        print(f"{optim:18s} state {result['state_bytes'] / 2 ** 20:7.1f} MiB ({result['bytes_per_parameter']:.2f} B per "
              f"parameter, {result['state_bytes'] / base['state_bytes']:.3f}x); step {result['step_seconds'] * 1e3:.0f} "
              f"ms ({result['step_seconds'] / base['step_seconds']:.1f}x), first step {result['first_step_seconds']:.1f} s")


if __name__ == "__main__":
    main()
