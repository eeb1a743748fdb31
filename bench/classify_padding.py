"""Benchmark: dynamic padding + length grouping vs padding the whole data set to its longest example.

    PYTHONPATH=. python bench/classify_padding.py [--steps 30] [--batch 32]

Length-skewed data (most sentences short, a few long, as in review or QA corpora), a tiny BERT classifier,
the job's own collator (trainer.classify.PaddingCollator) and sampler (trainer.data.samplers.GlobalBatchSampler
with and without `lengths`). Throughput counts real (non-pad) tokens per second of training
(forward + backward + AdamW step), so the padding that one setup wastes shows up as lost speed.
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch


def skewed_lengths(count: int, longest: int, seed: int = 0) -> np.ndarray:
    """90% short (8-40 tokens), 10% long (up to `longest`), the longest example present."""
    rng = np.random.default_rng(seed)
    lengths = np.where(rng.random(count) < 0.9, rng.integers(8, 41, count), rng.integers(41, longest + 1, count))
    lengths[0] = longest
    return lengths


def batches(lengths: np.ndarray, batch_size: int, grouped: bool, steps: int, vocab: int, pad_to: int | None):
    from trainer.classify import PaddingCollator
    from trainer.data.samplers import GlobalBatchSampler

    rng = np.random.default_rng(1)
    rows = [rng.integers(5, vocab, n) for n in lengths]
    sampler = GlobalBatchSampler(len(lengths), batch_size, 1, 0, 1, seed=0, lengths=lengths if grouped else None)
    collate = PaddingCollator(pad_token_id=0)
    for index_batch in list(sampler)[:steps]:
        picked = [rows[i] for i in index_batch]
        if pad_to is not None:  # the static baseline: every batch as wide as the longest example in the data
            picked = [np.pad(row, (0, pad_to - len(row))) for row in picked]
        batch = {"input_ids": np.array(picked, dtype=object) if pad_to is None else np.stack(picked),
                 "length": lengths[index_batch], "labels": rng.integers(0, 2, len(index_batch)),
                 "sample_id": np.asarray(index_batch)}
        yield collate(batch)


def throughput(model, stream) -> tuple[float, float]:
    """(real tokens/s, fraction of computed positions that are padding)."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    real = computed = 0
    started = None
    for index, batch in enumerate(stream):
        if index == 3:  # warm-up steps excluded
            started, real, computed = time.perf_counter(), 0, 0
        loss = torch.nn.functional.cross_entropy(
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits, batch["labels"])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        real += int(batch["attention_mask"].sum())
        computed += batch["input_ids"].numel()
    return real / (time.perf_counter() - started), 1 - real / computed


def main():
    from transformers import BertForSequenceClassification

    from trainer.data.demo import tiny_bert_config

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=4000)
    parser.add_argument("--longest", type=int, default=256)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args()
    lengths = skewed_lengths(args.examples, args.longest)
    torch.manual_seed(0)
    model = BertForSequenceClassification(tiny_bert_config(vocab_size=8000, num_labels=2)).train()
    print(f"{args.examples} examples, lengths: median {int(np.median(lengths))}, mean {lengths.mean():.1f}, "
          f"max {lengths.max()}; batch {args.batch}, {args.steps} steps; torch threads {torch.get_num_threads()}")
    results = {}
    for name, grouped, pad_to in (("padded to the longest example", False, args.longest),
                                  ("dynamic padding", False, None),
                                  ("dynamic padding + group_by_length", True, None)):
        speed, waste = throughput(model, batches(lengths, args.batch, grouped, args.steps + 3, 8000, pad_to))
        results[name] = speed
        print(f"{name:36s} {speed:10.0f} real tokens/s   padding {100 * waste:5.1f}% of computed positions")
    ratio = results["dynamic padding + group_by_length"] / results["padded to the longest example"]
    print(f"speed-up of dynamic padding + group_by_length over padding to the longest: {ratio:.1f}x")


if __name__ == "__main__":
    main()
