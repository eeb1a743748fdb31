"""Benchmark: trainer.mlm against the transformers Trainer on the same MLM job.

One fixture (a WordPiece tokenizer on the embedded corpus and a randomly initialised BERT saved locally) and the
same tokenized blocks feed both: the transformers `Trainer` with `DataCollatorForLanguageModeling`, and this
package's engine. Same model, batch, sequence length, steps, optimizer and precision. Each side runs in its own
process, `--repeats` times, alternating which side goes first (the machine's speed drifts); the script prints
every run, the median tokens/s of each side and the median of the per-pair ratios, peak resident memory, and the
eval loss of both trained models measured the same way: trainer.mlm's evaluation with its fixed masks.

    python bench/mlm_vs_trainer.py                    # fp32, 4-layer 256-wide BERT, batch 32 x 128
    python bench/mlm_vs_trainer.py --bf16             # bf16 autocast on both sides
    python bench/mlm_vs_trainer.py --torch_compile    # compile this engine's model (compile time included)
"""
from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import torch  # noqa: E402

from trainer.throughput import measure_matmul_peak, training_flops_per_token  # noqa: E402


def build_fixture(directory: str, layers: int, hidden: int, vocab_size: int) -> None:
    from transformers import BertConfig, BertForMaskedLM

    from trainer.default_data import train_wordpiece_tokenizer, write_mlm_corpus

    train, validation = write_mlm_corpus(os.path.join(directory, "corpus"))
    tokenizer = train_wordpiece_tokenizer([train], vocab_size=8000, output_dir=os.path.join(directory, "model"))
    # The vocabulary of the reference job (8k; BERT-base's 30522 on GPU), padded to a multiple of 64. The generated
    # corpus itself needs only ~2k tokens: the other rows exist and cost what they cost in a real model.
    config = BertConfig(vocab_size=64 * -(-max(vocab_size, len(tokenizer)) // 64), hidden_size=hidden, num_hidden_layers=layers,
                        num_attention_heads=hidden // 64, intermediate_size=4 * hidden, max_position_embeddings=512)
    import torch

    torch.manual_seed(0)
    BertForMaskedLM(config).save_pretrained(os.path.join(directory, "model"))


def blocks(directory: str, seq_len: int):
    """The tokenized, chunked training blocks, prepared by trainer.mlm's own pipeline (shared by both sides)."""
    from types import SimpleNamespace

    from transformers import AutoTokenizer

    from trainer.data import load_raw_splits
    from trainer.mlm import MLMArguments, tokenize_and_chunk

    corpus = os.path.join(directory, "corpus")
    data_args = SimpleNamespace(dataset_name=None, train_file=os.path.join(corpus, "train.txt"),
                                validation_file=os.path.join(corpus, "validation.txt"), max_seq_length=seq_len,
                                preprocessing_num_workers=None, overwrite_cache=False, validation_split_percentage=5)
    tokenizer = AutoTokenizer.from_pretrained(os.path.join(directory, "model"))
    return tokenizer, tokenize_and_chunk(load_raw_splits(data_args), "text", tokenizer, data_args, MLMArguments())


def run_transformers_trainer(directory: str, opts) -> dict:
    from transformers import (AutoModelForMaskedLM, DataCollatorForLanguageModeling, Trainer, TrainingArguments)

    tokenizer, data = blocks(directory, opts.seq_len)
    model = AutoModelForMaskedLM.from_pretrained(os.path.join(directory, "model"))
    args = TrainingArguments(
        output_dir=os.path.join(directory, "hf-out"), per_device_train_batch_size=opts.batch_size,
        max_steps=opts.steps, learning_rate=opts.learning_rate, warmup_steps=0, lr_scheduler_type="linear", weight_decay=0.01,
        bf16=opts.bf16, use_cpu=not torch.cuda.is_available(), report_to="none", save_strategy="no", eval_strategy="no",
        logging_steps=opts.steps, dataloader_num_workers=0, disable_tqdm=True, seed=0)
    trainer = Trainer(model=model, args=args, train_dataset=data["train"], eval_dataset=data["validation"],
                      data_collator=DataCollatorForLanguageModeling(tokenizer, mlm_probability=0.15, seed=0))
    metrics = trainer.train().metrics
    trainer.save_model(trained_model_dir(directory, "transformers"))
    tokenizer.save_pretrained(trained_model_dir(directory, "transformers"))
    tokens_per_second = metrics["train_samples_per_second"] * opts.seq_len
    flops = training_flops_per_token(model, opts.seq_len)  # the dense head: every position
    return {"tokens_per_second": tokens_per_second, "mfu": tokens_per_second * flops / peak_flops(opts)}


def trained_model_dir(directory: str, side: str) -> str:
    return os.path.join(directory, f"{side}-out")


def engine_argv(directory: str, model: str, output_dir: str, steps: int, opts) -> list[str]:
    corpus = os.path.join(directory, "corpus")
    return ["--model_name_or_path", model, "--train_file", os.path.join(corpus, "train.txt"),
            "--validation_file", os.path.join(corpus, "validation.txt"), "--max_seq_length", str(opts.seq_len),
            "--per_device_train_batch_size", str(opts.batch_size), "--max_steps", str(steps),
            "--learning_rate", str(opts.learning_rate), "--weight_decay", "0.01", "--report_to", "none",
            "--probe_sentences", "", "--output_dir", output_dir, "--overwrite_output_dir", "--seed", "0",
            "--peak_tflops", str(peak_flops(opts) / 1e12)]


def run_this_engine(directory: str, opts) -> dict:
    """Logs at steps/3 intervals: end-to-end tokens/s (as for the Trainer) and the last window's (steady state)."""
    from trainer.mlm import main

    output_dir = trained_model_dir(directory, "ours")
    argv = engine_argv(directory, os.path.join(directory, "model"), output_dir, opts.steps, opts)
    metrics = main(argv + ["--logging_steps", str(max(opts.steps // 3, 1))] + (["--bf16"] if opts.bf16 else [])
                   + (["--torch_compile"] if opts.torch_compile else []))
    with open(os.path.join(output_dir, "log_history.jsonl")) as handle:
        last_window = [json.loads(line) for line in handle if '"train_mfu"' in line][-1]
    return {"tokens_per_second": metrics["train_tokens_per_second"], "mfu": last_window["train_mfu"],
            "steady_tokens_per_second": last_window["train_tokens_per_second"]}


def fixed_mask_eval_loss(directory: str, side: str, opts) -> dict:
    """The eval loss of a trained model by trainer.mlm's own evaluation (fixed masks, fp32) before a first step."""
    from trainer.mlm import main

    metrics = main(engine_argv(directory, trained_model_dir(directory, side), os.path.join(directory, "eval-out"),
                               1, opts))
    return {"eval_loss": metrics["init_eval_loss"]}


def peak_flops(opts) -> float:
    """--peak_tflops, else the best large matrix-product rate measured here (the same figure for both sides)."""
    if opts.peak_tflops:
        return opts.peak_tflops * 1e12
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return measure_matmul_peak(device, torch.bfloat16 if opts.bf16 else torch.float32)


def child(side: str, directory: str, opts) -> None:
    if opts.evaluate:
        result = fixed_mask_eval_loss(directory, side, opts)
    else:
        result = (run_this_engine if side == "ours" else run_transformers_trainer)(directory, opts)
        result["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("RESULT " + json.dumps(result), flush=True)


def measure(side: str, directory: str, argv: list[str]) -> dict:
    env = {**os.environ, "PYTHONPATH": REPO, "TRAINER_CACHE": os.path.join(directory, "cache")}
    out = subprocess.run([sys.executable, __file__, "--side", side, "--fixture", directory, *argv], env=env,
                         capture_output=True, text=True)
    lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
    if out.returncode != 0 or not lines:
        raise SystemExit(f"{side} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--seq_len", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--learning_rate", type=float, default=1e-4)
    parser.add_argument("--vocab_size", type=int, default=8000)
    parser.add_argument("--torch_compile", action="store_true", help="compile this engine's model (ours only)")
    parser.add_argument("--peak_tflops", type=float, help="device peak for MFU (default: measured matmul peak)")
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each side, alternating which goes first")
    parser.add_argument("--side", choices=["ours", "transformers"], help=argparse.SUPPRESS)
    parser.add_argument("--fixture", help=argparse.SUPPRESS)
    parser.add_argument("--evaluate", action="store_true", help=argparse.SUPPRESS)
    opts = parser.parse_args()
    if opts.side:
        return child(opts.side, opts.fixture, opts)
    passthrough = list(sys.argv[1:])
    with tempfile.TemporaryDirectory() as directory:
        if opts.peak_tflops is None:  # measure once, so that both sides are divided by the same peak
            passthrough += ["--peak_tflops", str(peak_flops(opts) / 1e12)]
        build_fixture(directory, opts.layers, opts.hidden, opts.vocab_size)
        blocks(directory, opts.seq_len)  # tokenize once, outside both timings
        runs = alternating_runs(directory, passthrough, opts.repeats)
        # Same seed, same data: every repeat trains the same model; the last one of each side is evaluated.
        eval_loss = {side: measure(side, directory, passthrough + ["--evaluate"])["eval_loss"] for side in runs}
    report(runs, eval_loss, float(passthrough[passthrough.index("--peak_tflops") + 1]), opts)


def alternating_runs(directory: str, passthrough: list[str], repeats: int) -> dict:
    """{side: [result per repeat]}; odd repeats run this engine first, even ones the Trainer first."""
    runs = {"transformers": [], "ours": []}
    for repeat in range(repeats):
        for side in (("transformers", "ours") if repeat % 2 == 0 else ("ours", "transformers")):
            runs[side].append(measure(side, directory, passthrough))
        print(f"repeat {repeat + 1}: transformers {runs['transformers'][-1]['tokens_per_second']:.0f} tokens/s, ours "
              f"{runs['ours'][-1]['tokens_per_second']:.0f} tokens/s", flush=True)
    return runs


def report(runs: dict, eval_loss: dict, peak_tflops: float, opts) -> None:
    precision = "bf16" if opts.bf16 else "fp32"
    print(f"\nMLM, BERT {opts.layers}x{opts.hidden}, batch {opts.batch_size} x {opts.seq_len}, {opts.steps} steps, "
          f"{precision}{' + torch.compile (ours)' if opts.torch_compile else ''}, {len(runs['ours'])} alternating "
          f"runs per side, {time.strftime('%Y-%m-%d %H:%M')}")
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"{os.cpu_count()} CPUs"
    print(f"device: {device}; MFU against {peak_tflops:.2f} TFLOP/s")
    print(f"{'':14}{'tokens/s (median)':>18}{'MFU':>8}{'peak RSS MiB':>14}{'eval loss':>11}{'perplexity':>12}")
    for side, results in runs.items():
        print(f"{side:14}{median(results, 'tokens_per_second'):18.0f}{median(results, 'mfu'):8.1%}"
              f"{max(r['peak_rss_mib'] for r in results):14.0f}{eval_loss[side]:11.4f}"
              f"{math.exp(eval_loss[side]):12.1f}")
    print(f"this engine's steady state (last logging window): {median(runs['ours'], 'steady_tokens_per_second'):.0f} "
          f"tokens/s")
    ratios = [ours["tokens_per_second"] / theirs["tokens_per_second"]
              for ours, theirs in zip(runs["ours"], runs["transformers"])]
    print(f"ratio (ours / transformers Trainer) per repeat: {', '.join(f'{r:.2f}x' for r in ratios)}; "
          f"median {statistics.median(ratios):.2f}x")


def median(results: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in results)


if __name__ == "__main__":
    main()
