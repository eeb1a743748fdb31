"""--gradient_checkpointing on a deep, narrow model with long blocks: peak RSS and tokens/s without it, and with it
on every block, every 2nd and every 3rd block (--gradient_checkpointing_every).

The step is trainer.clm's: the model's body, then the fused output layer and cross-entropy (models/fused_loss.py),
so what remains of the activations is the blocks', which checkpointing trades for a second forward.

Each variant trains in its own process (peak RSS is a per-process high-water mark) on the same random tokens; the
ratios are to the run without checkpointing of the same invocation. Tokens per CPU second (the process's CPU time
in its fastest step: other work on the cores only ever slows a step) is the cost of the recomputation where other
work shares the cores and wall-clock tokens/s follows their load; run with OMP_NUM_THREADS=1 then, so that no
thread spins waiting for a core. Usage:
[OMP_NUM_THREADS=1] python bench/gradient_checkpointing.py [--steps 3] [--every 1 2 3]
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch

from harness import small_llama

SHAPE = dict(layers=12, hidden=128, block=512, batch=8, vocab=8000)


def train(every: int, steps: int) -> dict:
    """Train `steps` timed steps, checkpointing every `every`-th block (0: none)."""
    from trainer.models.checkpointing import checkpoint_blocks, checkpoint_options
    from trainer.models.fused_loss import fused_linear_cross_entropy

    model = small_llama(SHAPE["layers"], SHAPE["hidden"], SHAPE["vocab"], positions=SHAPE["block"])
    if every:
        checkpoint_blocks(model, checkpoint_options(None), every)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = torch.randint(0, SHAPE["vocab"], (SHAPE["batch"], SHAPE["block"]))
    before_training = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # torch, Python and the model
    times, cpu_times = [], []
    for _ in range(steps + 1):  # the first step warms up
        start, cpu_start = time.perf_counter(), time.process_time()
        # trainer.clm's loss: the body, then the fused output layer + cross-entropy (no [batch, block, vocab] logits)
        hidden = model.model(ids, use_cache=False).last_hidden_state[:, :-1].flatten(0, 1)
        fused_linear_cross_entropy(hidden, model.lm_head, ids[:, 1:].flatten(), 1024).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu_start)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    # Above the pre-training high-water mark: what training adds (activations, logits, gradients, AdamW state).
    return {"peak_rss_mib": peak, "training_rss_mib": peak - before_training,
            "tokens_per_s": SHAPE["batch"] * SHAPE["block"] * steps / sum(times[1:]),
            "tokens_per_cpu_s": SHAPE["batch"] * SHAPE["block"] / min(cpu_times[1:])}  # the least disturbed step


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--every", type=int, nargs="+", default=[1, 2, 3],
                        help="checkpoint every k-th block, one run per k (beside the run without checkpointing)")
    parser.add_argument("--variant", type=int, help=argparse.SUPPRESS)  # a child: checkpoint every k-th (0: none)
    args = parser.parse_args()
    if args.variant is not None:
        print(json.dumps(train(args.variant, args.steps)))
        return
    results = {}
    for every in (0, *args.every):
        out = subprocess.run([sys.executable, __file__, "--variant", str(every), "--steps", str(args.steps)],
                             capture_output=True, text=True, check=True).stdout
        results[every] = json.loads(out.strip().splitlines()[-1])
        print(f"every {every}" if every else "none", results[every])
    print(SHAPE)
    for every in args.every:
        ratio = {key: results[every][key] / results[0][key] for key in results[0]}
        print(f"every {every}: / none: peak RSS {ratio['peak_rss_mib']:.2f}x, memory training adds "
              f"{ratio['training_rss_mib']:.2f}x, tokens/s {ratio['tokens_per_s']:.2f}x, tokens per CPU second "
              f"{ratio['tokens_per_cpu_s']:.2f}x")


if __name__ == "__main__":
    main()
