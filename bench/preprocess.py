"""Benchmark: tokenize + chunk a generated corpus the way trainer.mlm does, against the usual alternatives.

Tokenization is shared; the chunking ("group texts") step is timed three ways on the same tokenized data:
  ours       one numpy concatenation + reshape per map batch (trainer.mlm's MLM_TOKENIZATION.sequences)
  chain      the transformers run_mlm.py example: list(itertools.chain(*lists)) per column
  naive      sum(lists, []) per column: quadratic in the batch size (timed on a slice; it would take far longer)
Each corpus size runs in a fresh process so its peak resident memory is its own; it stays flat as the corpus
grows because datasets streams map batches to the Arrow cache on disk.

    python bench/preprocess.py                 # 10 MB and 50 MB, 2 tokenization workers
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
BLOCK = 128


def write_corpus(path: str, megabytes: int) -> int:
    from trainer.data.demo import generate_reviews

    written, seed = 0, 0
    with open(path, "w") as handle:
        while written < megabytes * 1_000_000:
            text = "\n".join(review["text"] for review in generate_reviews(20_000, seed=seed)) + "\n"
            handle.write(text)
            written += len(text.encode())
            seed += 1
    return written


def chain_chunk(batch):
    concatenated = {k: list(itertools.chain(*batch[k])) for k in batch}
    total = (len(concatenated["input_ids"]) // BLOCK) * BLOCK
    return {k: [t[i:i + BLOCK] for i in range(0, total, BLOCK)] for k, t in concatenated.items()}


def naive_chunk(batch):
    concatenated = {k: sum(batch[k], []) for k in batch}
    total = (len(concatenated["input_ids"]) // BLOCK) * BLOCK
    return {k: [t[i:i + BLOCK] for i in range(0, total, BLOCK)] for k, t in concatenated.items()}


def run_size(megabytes: int, workers: int, directory: str) -> dict:
    import datasets
    from transformers import AutoTokenizer

    from trainer.data.demo import train_wordpiece_tokenizer
    from trainer.data.loading import chunk_into_blocks
    from trainer.mlm import MLM_TOKENIZATION, MLMArguments

    datasets.disable_progress_bars()
    corpus = os.path.join(directory, f"corpus-{megabytes}.txt")
    size = write_corpus(corpus, megabytes)
    tokenizer_dir = os.path.join(directory, "tokenizer")
    if not os.path.isdir(tokenizer_dir):
        train_wordpiece_tokenizer([corpus], vocab_size=8000, output_dir=tokenizer_dir)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    raw = datasets.DatasetDict({"train": datasets.load_dataset("text", data_files=corpus, split="train",
                                                                cache_dir=os.path.join(directory, "cache"))})
    from types import SimpleNamespace

    data_args = SimpleNamespace(max_seq_length=BLOCK, preprocessing_num_workers=workers, overwrite_cache=True)
    started = time.perf_counter()
    config = SimpleNamespace(data=data_args, mlm=MLMArguments())
    ours = MLM_TOKENIZATION.sequences(config, raw, "text", tokenizer, BLOCK)["train"]
    ours_seconds = time.perf_counter() - started

    tokenized = raw["train"].map(lambda b: tokenizer(b["text"], return_special_tokens_mask=True), batched=True,
                                 num_proc=workers, remove_columns=["text"])
    result = {"megabytes": size / 1e6, "ours_total_seconds": ours_seconds, "blocks": len(ours)}
    for name, function, rows in (("chain", chain_chunk, len(tokenized)), ("naive", naive_chunk, min(len(tokenized), 50_000))):
        subset = tokenized.select(range(rows))
        started = time.perf_counter()
        subset.map(function, batched=True, num_proc=workers, load_from_cache_file=False)
        result[f"{name}_chunk_mb_per_second"] = size / 1e6 * rows / len(tokenized) / (time.perf_counter() - started)
    started = time.perf_counter()
    tokenized.map(chunk_into_blocks, batched=True, num_proc=workers, load_from_cache_file=False,
                  fn_kwargs={"length": BLOCK})
    result["ours_chunk_mb_per_second"] = size / 1e6 / (time.perf_counter() - started)
    result["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    result["peak_rss_workers_mib"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10, 50], help="corpus sizes in MB")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--size", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--directory", help=argparse.SUPPRESS)
    opts = parser.parse_args()
    if opts.size:
        print("RESULT " + json.dumps(run_size(opts.size, opts.workers, opts.directory)))
        return
    with tempfile.TemporaryDirectory() as directory:
        results = []
        for size in opts.sizes:
            out = subprocess.run([sys.executable, __file__, "--size", str(size), "--workers", str(opts.workers),
                                  "--directory", directory], capture_output=True, text=True, env={
                                      **os.environ, "PYTHONPATH": REPO})
            line = [l for l in out.stdout.splitlines() if l.startswith("RESULT ")]
            if not line:
                raise SystemExit(out.stderr[-3000:])
            results.append(json.loads(line[0][7:]))
    print(f"\ntokenize + chunk, blocks of {BLOCK}, {opts.workers} workers, {os.cpu_count()} CPUs, "
          f"{time.strftime('%Y-%m-%d')}")
    print(f"{'MB':>6}{'ours total MB/s':>17}{'chunk MB/s: ours':>18}{'chain':>9}{'naive':>9}{'peak RSS MiB':>14}"
          f"{'workers':>9}")
    for r in results:
        print(f"{r['megabytes']:6.0f}{r['megabytes'] / r['ours_total_seconds']:17.2f}"
              f"{r['ours_chunk_mb_per_second']:18.1f}{r['chain_chunk_mb_per_second']:9.1f}"
              f"{r['naive_chunk_mb_per_second']:9.2f}{r['peak_rss_mib']:14.0f}{r['peak_rss_workers_mib']:9.0f}")


if __name__ == "__main__":
    main()
