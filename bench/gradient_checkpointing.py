"""--gradient_checkpointing on a deep, narrow model with long blocks: peak RSS and tokens/s, with and without.

Each variant trains in its own process (peak RSS is a per-process high-water mark) on the same random tokens; the
ratios are of the two processes of one run. Usage: python bench/gradient_checkpointing.py [--steps 3]
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch

SHAPE = dict(layers=12, hidden=128, block=512, batch=8, vocab=8000)


def train(checkpointed: bool, steps: int) -> dict:
    from transformers import LlamaConfig, LlamaForCausalLM

    from trainer.models.checkpointing import checkpoint_blocks, checkpoint_options

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=SHAPE["vocab"], hidden_size=SHAPE["hidden"], intermediate_size=4 * SHAPE["hidden"],
                         num_hidden_layers=SHAPE["layers"], num_attention_heads=4, num_key_value_heads=4,
                         max_position_embeddings=SHAPE["block"])
    model = LlamaForCausalLM(config).train()
    if checkpointed:
        checkpoint_blocks(model, checkpoint_options(None))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = torch.randint(0, SHAPE["vocab"], (SHAPE["batch"], SHAPE["block"]))
    times = []
    for _ in range(steps + 1):  # the first step warms up
        start = time.perf_counter()
        model(ids, labels=ids, use_cache=False).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    return {"peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "tokens_per_s": SHAPE["batch"] * SHAPE["block"] * steps / sum(times[1:])}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--variant", choices=["plain", "checkpointed"])
    args = parser.parse_args()
    if args.variant:
        print(json.dumps(train(args.variant == "checkpointed", args.steps)))
        return
    results = {}
    for variant in ("plain", "checkpointed"):
        out = subprocess.run([sys.executable, __file__, "--variant", variant, "--steps", str(args.steps)],
                             capture_output=True, text=True, check=True).stdout
        results[variant] = json.loads(out.strip().splitlines()[-1])
        print(variant, results[variant])
    print(f"{SHAPE}: checkpointed / plain: peak RSS "
          f"{results['checkpointed']['peak_rss_mib'] / results['plain']['peak_rss_mib']:.2f}x, tokens/s "
          f"{results['checkpointed']['tokens_per_s'] / results['plain']['tokens_per_s']:.2f}x")


if __name__ == "__main__":
    main()
