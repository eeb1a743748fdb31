"""Benchmark: `python -m trainer.prepare` with 1 and 2 processes, and a job's start-up from the prepared directory
against its start-up from the raw text.

On a generated corpus (bench/preprocess.py's movie reviews), each run in a fresh process with its own, empty datasets
cache (nothing is reused between runs):
  prepare, 1 process       python -m trainer.prepare --job mlm ... (blocks of 128, a WordPiece tokenizer)
  prepare, 2 processes     torchrun --nproc_per_node 2 -m trainer.prepare ... (same blocks: checked)
  start-up, raw text       python -m trainer.mlm --train_file corpus.txt --max_steps 1 (a tiny BERT): tokenizes
  start-up, prepared       python -m trainer.mlm --train_file prepared/ --max_steps 1: opens the shards
MB/s are of the text file, over the wall time of the whole command (imports and start-up included) and over the
time prepare logs for its own work ("prepared ... in Xs").

    python bench/prepare.py                    # 50 MB
    python bench/prepare.py --megabytes 100
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time

BENCH = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(BENCH)
sys.path.insert(0, REPO)
sys.path.insert(0, BENCH)

from preprocess import write_corpus  # noqa: E402

TINY_BERT = ["--model_type", "bert", "--config_overrides",
             "hidden_size=32,num_hidden_layers=2,num_attention_heads=2,intermediate_size=64"]
TOKENIZER_SAMPLE_MB = 5


def timed(command: list[str], directory: str, name: str) -> tuple[float, str]:
    """(wall seconds, its log: stdout and stderr) of `command` with a fresh datasets cache of its own."""
    env = {**os.environ, "PYTHONPATH": REPO, "HF_DATASETS_CACHE": os.path.join(directory, f"cache-{name}"),
           "TRAINER_CACHE": os.path.join(directory, f"trainer-cache-{name}"), "HF_HUB_OFFLINE": "1",
           "OMP_NUM_THREADS": "1"}
    started = time.perf_counter()
    result = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(command)} exited {result.returncode}\n{result.stderr[-3000:]}")
    print(f"{name}: {seconds:.1f}s", flush=True)
    return seconds, result.stdout + result.stderr


def own_seconds(log: str) -> float:
    return float(re.search(r"INFO prepared .* in ([\d.]+)s", log).group(1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--megabytes", type=int, default=50, help="corpus size")
    opts = parser.parse_args()
    from trainer.data.demo import train_wordpiece_tokenizer
    from trainer.data.prepared import PreparedData

    with tempfile.TemporaryDirectory() as directory:
        corpus, sample = os.path.join(directory, "corpus.txt"), os.path.join(directory, "sample.txt")
        size = write_corpus(corpus, opts.megabytes) / 1e6
        write_corpus(sample, TOKENIZER_SAMPLE_MB)
        tokenizer = os.path.join(directory, "tokenizer")
        train_wordpiece_tokenizer([sample], vocab_size=8000, output_dir=tokenizer)
        data = ["--train_file", corpus, "--tokenizer_name", tokenizer, "--max_seq_length", "128"]
        prepare = ["-m", "trainer.prepare", "--job", "mlm", *data]
        torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533"]
        runs = {}
        for processes, launcher in ((1, [sys.executable]), (2, torchrun)):
            output = os.path.join(directory, f"prepared-{processes}")
            runs[processes] = timed([*launcher, *prepare, "--output_dir", output], directory, f"prepare-{processes}")
        one, two = (PreparedData.open(os.path.join(directory, f"prepared-{n}")) for n in (1, 2))
        assert one.split("train")[:1000] == two.split("train")[:1000] and (
            one.manifest["splits"]["train"]["sequences"] == two.manifest["splits"]["train"]["sequences"])
        job = [sys.executable, "-m", "trainer.mlm", *TINY_BERT, "--max_steps", "1", "--max_eval_samples", "16",
               "--report_to", "none", "--probe_sentences", "", "--peak_tflops", "1"]
        raw_start, _ = timed([*job, *data, "--output_dir", os.path.join(directory, "job-raw")], directory, "job-raw")
        prepared_start, _ = timed([*job, "--train_file", one.directory, "--max_seq_length", "128", "--output_dir",
                                   os.path.join(directory, "job-prepared")], directory, "job-prepared")
    print(f"\ntrainer.prepare --job mlm, {size:.0f} MB corpus, blocks of 128, {os.cpu_count()} CPUs, "
          f"{time.strftime('%Y-%m-%d')}; {one.manifest['splits']['train']['sequences']} training blocks")
    print(f"{'':28}{'wall s':>9}{'MB/s (wall)':>13}{'prepare s':>11}{'MB/s':>8}")
    for processes, (wall, log) in runs.items():
        print(f"{f'prepare, {processes} process(es)':28}{wall:9.1f}{size / wall:13.2f}{own_seconds(log):11.1f}"
              f"{size / own_seconds(log):8.2f}")
    print(f"2 processes / 1 process: {runs[1][0] / runs[2][0]:.2f}x (wall), "
          f"{own_seconds(runs[1][1]) / own_seconds(runs[2][1]):.2f}x (prepare's own time)")
    print(f"{'mlm --max_steps 1, raw text':28}{raw_start:9.1f}")
    print(f"{'mlm --max_steps 1, prepared':28}{prepared_start:9.1f}   {raw_start / prepared_start:.1f}x faster")


if __name__ == "__main__":
    main()
