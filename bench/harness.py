"""What every bench/<job>_vs_trainer.py shares: the command line, one process per measured run, alternating
repeats, the matrix-product peak for MFU, and the report.

A benchmark script defines its job's fixture (`build_fixture(directory, opts)`), the shared data preparation
(`prepare(directory, opts)`, run once outside both timings), the Trainer's training run (`run_transformers`:
directory, opts -> {"tokens_per_second", "mfu"}) and what its job's command line adds to the shared one
(`job_flags(opts)`), then calls `main(__file__, title, opts, ..., job="trainer.<job>")`. This engine's side is
that job's `main`, for training and, on both trained models, for the evaluation.
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

from trainer.engine.throughput import measure_matmul_peak, training_flops_per_token

SIDES = ("transformers", "ours")


def small_llama(layers: int, hidden: int, vocab: int, positions: int):
    """A seeded Llama from scratch for the CPU benches: `layers` blocks of width `hidden`, 4 heads, an MLP 4x wide,
    in training mode."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=positions)
    return LlamaForCausalLM(config).train()


def parser(description: str, **defaults) -> argparse.ArgumentParser:
    """The options every benchmark takes; `defaults` override the model/batch defaults per job."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    settings = dict(steps=30, batch_size=32, seq_len=128, layers=4, hidden=256, learning_rate=1e-4, vocab_size=8000)
    settings.update(defaults)
    for name, value in settings.items():
        p.add_argument(f"--{name}", type=type(value), default=value)
    p.add_argument("--torch_compile", action="store_true", help="compile this engine's model (ours only)")
    p.add_argument("--peak_tflops", type=float, help="device peak for MFU (default: measured matmul peak)")
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--repeats", type=int, default=3, help="runs of each side, alternating which goes first")
    p.add_argument("--side", choices=SIDES, help=argparse.SUPPRESS)
    p.add_argument("--fixture", help=argparse.SUPPRESS)
    p.add_argument("--evaluate", action="store_true", help=argparse.SUPPRESS)
    return p


def transformers_training_arguments(directory: str, opts):
    """The Trainer's side of the shared configuration: same batch, steps, optimizer, schedule and precision."""
    from transformers import TrainingArguments

    return TrainingArguments(
        output_dir=os.path.join(directory, "hf-out"), per_device_train_batch_size=opts.batch_size,
        max_steps=opts.steps, learning_rate=opts.learning_rate, warmup_steps=0, lr_scheduler_type="linear",
        weight_decay=0.01, bf16=opts.bf16, use_cpu=not torch.cuda.is_available(), report_to="none",
        save_strategy="no", eval_strategy="no", logging_steps=opts.steps, dataloader_num_workers=0,
        disable_tqdm=True, seed=0)


def train_transformers(trainer, tokenizer, directory: str, opts) -> dict:
    """Train, save the model for the evaluation, and report tokens/s and MFU (dense head: every position)."""
    metrics = trainer.train().metrics
    trainer.save_model(trained_model_dir(directory, "transformers"))
    tokenizer.save_pretrained(trained_model_dir(directory, "transformers"))
    tokens_per_second = metrics["train_samples_per_second"] * opts.seq_len
    flops = training_flops_per_token(trainer.model, opts.seq_len)
    return {"tokens_per_second": tokens_per_second, "mfu": tokens_per_second * flops / peak_flops(opts)}


def engine_argv(directory: str, model: str, output_dir: str, steps: int, opts, job_flags: list[str]) -> list[str]:
    """This engine's side of the shared configuration (`job_flags`: the job's sequence length and probe flags)."""
    corpus = os.path.join(directory, "corpus")
    return ["--model_name_or_path", model, "--train_file", os.path.join(corpus, "train.txt"),
            "--validation_file", os.path.join(corpus, "validation.txt"), *job_flags,
            "--per_device_train_batch_size", str(opts.batch_size), "--max_steps", str(steps),
            "--learning_rate", str(opts.learning_rate), "--weight_decay", "0.01", "--report_to", "none",
            "--output_dir", output_dir, "--overwrite_output_dir", "--seed", "0",
            "--peak_tflops", str(peak_flops(opts) / 1e12)]


def train_this_engine(job_main, job_flags: list[str], directory: str, opts) -> dict:
    """Logs at steps/3 intervals: end-to-end tokens/s (as for the Trainer) and the last window's (steady state)."""
    output_dir = trained_model_dir(directory, "ours")
    argv = engine_argv(directory, os.path.join(directory, "model"), output_dir, opts.steps, opts, job_flags)
    metrics = job_main(argv + ["--logging_steps", str(max(opts.steps // 3, 1))] + (["--bf16"] if opts.bf16 else [])
                       + (["--torch_compile"] if opts.torch_compile else []))
    last_window = last_logged_window(output_dir)
    return {"tokens_per_second": metrics["train_tokens_per_second"], "mfu": last_window["train_mfu"],
            "steady_tokens_per_second": last_window["train_tokens_per_second"]}


def engine_eval_loss(job_main, job_flags: list[str], directory: str, side: str, opts) -> dict:
    """The eval loss of a trained side by the job's own evaluation (fp32) before a first step."""
    metrics = job_main(engine_argv(directory, trained_model_dir(directory, side), os.path.join(directory, "eval-out"),
                                   1, opts, job_flags))
    return {"eval_loss": metrics["init_eval_loss"]}


def trained_model_dir(directory: str, side: str) -> str:
    return os.path.join(directory, f"{side}-out")


def peak_flops(opts) -> float:
    """--peak_tflops, else the best large matrix-product rate measured here (the same figure for both sides)."""
    if opts.peak_tflops:
        return opts.peak_tflops * 1e12
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return measure_matmul_peak(device, torch.bfloat16 if opts.bf16 else torch.float32)


def last_logged_window(output_dir: str) -> dict:
    """This engine's last logging window with throughput figures (steady state)."""
    with open(os.path.join(output_dir, "log_history.jsonl")) as handle:
        return [json.loads(line) for line in handle if '"train_mfu"' in line][-1]


def main(script: str, title: str, opts, build_fixture, prepare, run_transformers, job: str, job_flags) -> None:
    """In a child (--side): one measured run or evaluation, printed as a RESULT line. Otherwise: the fixture,
    alternating runs of both sides in their own processes, both trained models evaluated, the report."""
    if opts.side:
        import importlib

        job_main = importlib.import_module(job).main
        if opts.evaluate:
            result = engine_eval_loss(job_main, job_flags(opts), opts.fixture, opts.side, opts)
        elif opts.side == "ours":
            result = train_this_engine(job_main, job_flags(opts), opts.fixture, opts)
        else:
            result = run_transformers(opts.fixture, opts)
        if not opts.evaluate:
            result["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print("RESULT " + json.dumps(result), flush=True)
        return
    passthrough = list(sys.argv[1:])
    with tempfile.TemporaryDirectory() as directory:
        if opts.peak_tflops is None:  # measure once, so that both sides are divided by the same peak
            passthrough += ["--peak_tflops", str(peak_flops(opts) / 1e12)]
        build_fixture(directory, opts)
        prepare(directory, opts)  # tokenize once, outside both timings
        runs = alternating_runs(script, directory, passthrough, opts.repeats)
        # Same seed, same data: every repeat trains the same model; the last one of each side is evaluated.
        eval_loss = {side: measure(script, side, directory, passthrough + ["--evaluate"])["eval_loss"]
                     for side in runs}
    report(title, runs, eval_loss, float(passthrough[passthrough.index("--peak_tflops") + 1]), opts)


def measure(script: str, side: str, directory: str, argv: list[str]) -> dict:
    env = {**os.environ, "PYTHONPATH": REPO, "TRAINER_CACHE": os.path.join(directory, "cache")}
    out = subprocess.run([sys.executable, script, "--side", side, "--fixture", directory, *argv], env=env,
                         capture_output=True, text=True)
    lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
    if out.returncode != 0 or not lines:
        raise SystemExit(f"{side} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def alternating_runs(script: str, directory: str, passthrough: list[str], repeats: int) -> dict:
    """{side: [result per repeat]}; odd repeats run this engine first, even ones the Trainer first."""
    runs = {side: [] for side in SIDES}
    for repeat in range(repeats):
        for side in (SIDES if repeat % 2 == 0 else SIDES[::-1]):
            runs[side].append(measure(script, side, directory, passthrough))
        print(f"repeat {repeat + 1}: transformers {runs['transformers'][-1]['tokens_per_second']:.0f} tokens/s, ours "
              f"{runs['ours'][-1]['tokens_per_second']:.0f} tokens/s", flush=True)
    return runs


def report(title: str, runs: dict, eval_loss: dict, peak_tflops: float, opts) -> None:
    precision = "bf16" if opts.bf16 else "fp32"
    print(f"\n{title}, batch {opts.batch_size} x {opts.seq_len}, {opts.steps} steps, {precision}"
          f"{' + torch.compile (ours)' if opts.torch_compile else ''}, {len(runs['ours'])} alternating runs per side, "
          f"{time.strftime('%Y-%m-%d %H:%M')}")
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
    memory = [ours["peak_rss_mib"] / theirs["peak_rss_mib"] for ours, theirs in zip(runs["ours"], runs["transformers"])]
    print(f"ratio (ours / transformers Trainer) per repeat: {', '.join(f'{r:.2f}x' for r in ratios)}; "
          f"median {statistics.median(ratios):.2f}x")
    print(f"peak RSS ratio (ours / transformers Trainer) per repeat: {', '.join(f'{r:.2f}x' for r in memory)}; "
          f"median {statistics.median(memory):.2f}x")


def median(results: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in results)
