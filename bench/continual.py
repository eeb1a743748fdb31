"""Benchmark: learning a second task without forgetting the first (issue #14, docs/continual.md).

Task A is the embedded movie-review sentiment data (trainer.data.demo.write_sentiment_dataset), task B the
product-review sentiment data (write_product_sentiment_dataset): same labels, another domain, and some cue words
of opposite polarity ("predictable", "cheap" are good in a product, "thrilling", "sharp" bad), so that fine-tuning
on B alone overwrites what A needs. Every model starts from one base: a tiny ModernBERT (2 layers, 64 wide; the
MLM demo's architecture: the BERT preset stays on the unigram plateau in so few steps, and a classifier started
from such a collapsed base does not learn; mean pooling: an MLM never trains the [CLS] output that a frozen base
would otherwise give adapters) with a WordPiece tokenizer, both trained by a short trainer.mlm run on
the text of both domains' training sets; the base is cached (TRAINER_CACHE or ~/.cache/trainer, continual-bench/)
and reused while its settings and data are the same. Then, through the jobs' own command lines
(`python -m trainer.classify ...`, one process per run):

    A         full fine-tuning of the base on A (with --save_fisher when the package has EWC)
    naive     A's model fine-tuned on B
    ewc       the same with --ewc_from A --ewc_lambda L
    replay    the same with --replay_file A's training file --replay_ratio R
    ewc+replay  both
    adapters  an adapter for A on the frozen base, then a second adapter for B added to that model
    lwf       learning without forgetting: --teacher A (distillation from the previous model on B's data)

Each model is evaluated here, in one process, on both validation sets with the same code: the model loaded with
from_pretrained (an adapter with trainer.finetune.adapters.load_adapter_model and its name), the base tokenizer, argmax
over the logits. The table gives A's accuracy before and after B, B's accuracy and the forgetting (A's accuracy
lost, in points), and is written as JSON. A method whose flags the package does not know (a part of #14 not
merged yet) is skipped with a message.

    python bench/continual.py                           # every method, default hyperparameters
    python bench/continual.py --methods naive lwf --lwf_alpha 0.8
    python bench/continual.py --work_dir /tmp/continual # keep every run's output directory
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

METHODS = ("naive", "ewc", "replay", "ewc+replay", "adapters", "lwf")
# What each method needs from trainer.classify's command line (the contract of issue #14).
REQUIRED_FLAGS = {
    "naive": set(),
    "ewc": {"--save_fisher", "--ewc_from", "--ewc_lambda"},
    "replay": {"--replay_file", "--replay_ratio"},
    "ewc+replay": {"--save_fisher", "--ewc_from", "--ewc_lambda", "--replay_file", "--replay_ratio"},
    "adapters": {"--adapter_name", "--adapter_config", "--adapter_reduction_factor"},
    "lwf": {"--teacher", "--distill_alpha", "--distill_temperature"},
}
TASK_A, TASK_B = "movies", "products"


def options() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    p.add_argument("--train_samples", type=int, default=2000, help="training sentences used of each task")
    p.add_argument("--epochs", type=float, default=3.0, help="epochs on each task")
    p.add_argument("--learning_rate", type=float, default=1e-3, help="full fine-tuning (A, naive, ewc, replay, lwf)")
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--max_seq_length", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--pretrain_steps", type=int, default=1000, help="trainer.mlm steps of the cached base model")
    p.add_argument("--model_type", default="modernbert", help="architecture of the base model")
    # Mean pooling: a frozen base's [CLS] output carries too little for adapters (an MLM never trains it).
    p.add_argument("--model", default="hidden_size=64,num_hidden_layers=2,num_attention_heads=2,intermediate_size=128,"
                                      "max_position_embeddings=128,classifier_pooling=mean",
                   help="--config_overrides of the base model")
    p.add_argument("--fisher_samples", type=int, help="ewc: --fisher_samples of the A run (default: the package's)")
    # Defaults from sweeps on this benchmark (BENCHMARKS.md): lambda 1e3, 1e4, 5e4, 1e5, 2e5, 1e6; ratio 0.1, 0.15, 0.25.
    p.add_argument("--ewc_lambda", type=float, default=1e5, help="ewc: --ewc_lambda of the B run")
    p.add_argument("--replay_ratio", type=float, default=0.15, help="replay: fraction of A samples in B's batches")
    p.add_argument("--lwf_alpha", type=float, default=0.3, help="lwf: --distill_alpha (weight of the teacher term)")
    p.add_argument("--lwf_temperature", type=float, default=2.0, help="lwf: --distill_temperature")
    p.add_argument("--adapter_config", default="houlsby", choices=["houlsby", "pfeiffer"])
    # A 64-wide base: the package's default factor 16 would leave a 4-wide bottleneck; 2 leaves 32.
    p.add_argument("--adapter_reduction_factor", type=int, default=2)
    p.add_argument("--adapter_learning_rate", type=float, default=3e-3, help="adapters train faster than a full model")
    # A frozen 64-wide base needs many more steps than full fine-tuning (3 epochs: 60-65% on A; 10: about 80%).
    p.add_argument("--adapter_epochs", type=float, default=10.0, help="adapters: epochs on each task")
    p.add_argument("--work_dir", help="keep the runs' output directories here (default: a temporary directory)")
    p.add_argument("--json", default="continual_results.json", help="where the table is written as JSON")
    return p.parse_args()


# ------------------------------------------------------------------------------------------------------ runs
def job_env(work_dir: str) -> dict:
    return {**os.environ, "PYTHONPATH": REPO, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
            "HF_DATASETS_CACHE": os.path.join(work_dir, "datasets-cache")}


def run_job(module: str, argv: list[str], work_dir: str, what: str) -> float:
    """One job in its own process; returns its wall time. A failure ends the benchmark with the job's output."""
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", module, *argv], env=job_env(work_dir), capture_output=True,
                         text=True)
    if out.returncode != 0:
        raise SystemExit(f"{what} failed (exit {out.returncode}): python -m {module} {' '.join(argv)}\n"
                         f"{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    seconds = time.perf_counter() - start
    print(f"  {what}: {seconds:.0f} s", flush=True)
    return seconds


def classify(opts, work_dir: str, name: str, model: str, task: dict, *flags: str,
             learning_rate: float | None = None, epochs: float | None = None) -> str:
    """trainer.classify on `task`'s files from `model`; returns the output directory."""
    output_dir = os.path.join(work_dir, name)
    run_job("trainer.classify", [
        "--model_name_or_path", model, "--train_file", task["train"], "--validation_file", task["validation"],
        "--output_dir", output_dir, "--overwrite_output_dir", "--max_train_samples", str(opts.train_samples),
        "--max_seq_length", str(opts.max_seq_length), "--per_device_train_batch_size", str(opts.batch_size),
        "--per_device_eval_batch_size", "128", "--learning_rate", str(learning_rate or opts.learning_rate),
        "--num_train_epochs", str(epochs or opts.epochs), "--warmup_ratio", "0.1", "--weight_decay", "0.01",
        "--seed", str(opts.seed), "--metrics", "accuracy", "--logging_steps", "1000", "--report_to", "none",
        *flags], work_dir, name)
    return output_dir


def pretrained_base(opts, tasks: dict, work_dir: str) -> str:
    """The cached MLM base: a tokenizer and a tiny BERT trained on both domains' training text."""
    from trainer.models.loading import cache_dir

    sentences = [json.loads(line)["sentence"] for task in tasks.values() for line in open(task["train"])]
    random.Random(0).shuffle(sentences)
    text = "".join(sentence + "\n" for sentence in sentences)
    settings = f"{opts.model_type} {opts.model} {opts.pretrain_steps} {opts.max_seq_length} {opts.seed}"
    key = hashlib.sha256(f"{settings}\n{text}".encode()).hexdigest()[:16]
    base = cache_dir("continual-bench", f"base-{key}")
    if os.path.isfile(os.path.join(base, "model.safetensors")):
        print(f"base model: cached, {base}", flush=True)
        return base
    corpus = os.path.join(work_dir, "both-domains.txt")
    with open(corpus, "w") as handle:
        handle.write(text)
    building = f"{base}.building-{os.getpid()}"
    run_job("trainer.mlm", [
        "--train_file", corpus, "--model_type", opts.model_type, "--config_overrides", opts.model,
        "--output_dir", building, "--overwrite_output_dir", "--max_seq_length",
        str(opts.max_seq_length), "--per_device_train_batch_size", "32", "--learning_rate", "2e-3",
        "--warmup_ratio", "0.1", "--weight_decay", "0.01", "--max_steps", str(opts.pretrain_steps),
        "--seed", str(opts.seed), "--probe_sentences", "", "--logging_steps", "1000", "--report_to", "none"],
        work_dir, f"base model (trainer.mlm, {opts.pretrain_steps} steps, cached in {base})")
    os.replace(building, base)
    return base


# ------------------------------------------------------------------------------------------------ evaluation
def accuracy(model, tokenizer, path: str, max_length: int) -> float:
    """Accuracy in percent on a jsonl file of {"sentence", "label"}: argmax of the logits, labels by name."""
    import torch

    rows = [json.loads(line) for line in open(path)]
    names = {int(i): label for i, label in model.config.id2label.items()}
    correct = 0
    model.eval()
    with torch.no_grad():
        for start in range(0, len(rows), 128):
            chunk = rows[start:start + 128]
            batch = tokenizer([row["sentence"] for row in chunk], truncation=True, max_length=max_length,
                              padding=True, return_tensors="pt")
            predictions = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            correct += sum(names[int(p)] == row["label"] for p, row in zip(predictions.argmax(-1), chunk))
    return 100 * correct / len(rows)


def load_classifier(directory: str, adapter_name: str | None = None):
    if adapter_name is not None:
        from trainer.finetune.adapters import load_adapter_model

        return load_adapter_model(directory, adapter_name)
    from transformers import AutoModelForSequenceClassification

    return AutoModelForSequenceClassification.from_pretrained(directory)


# ------------------------------------------------------------------------------------------------ the methods
def known_flags() -> tuple[set, list]:
    """The option strings trainer.classify accepts here, and its fine-tuning strategies."""
    from trainer import classify
    from trainer.config.parsing import job_parser

    parser = job_parser(tuple(classify.CLASSIFY_JOB.all_sections.values()), None)
    return set(parser._option_string_actions), list(parser._option_string_actions["--finetune_strategy"].choices)


def available(method: str, flags: set, strategies: list) -> str | None:
    """None if the installed package can run `method`, else why not."""
    missing = sorted(REQUIRED_FLAGS[method] - flags)
    if method == "adapters" and "adapter" not in strategies:
        missing.insert(0, "--finetune_strategy adapter")
    if missing:
        return f"trainer.classify here has no {', '.join(missing)} (that part of issue #14 is not in this checkout)"
    return None


def method_flags(method: str, opts, a_dir: str, tasks: dict) -> list[str]:
    ewc = ["--ewc_from", a_dir, "--ewc_lambda", str(opts.ewc_lambda)]
    replay = ["--replay_file", tasks[TASK_A]["train"], "--replay_ratio", str(opts.replay_ratio)]
    return {"naive": [], "ewc": ewc, "replay": replay, "ewc+replay": ewc + replay,
            "lwf": ["--teacher", a_dir, "--distill_alpha", str(opts.lwf_alpha),
                    "--distill_temperature", str(opts.lwf_temperature)]}[method]


def adapter_flags(opts, name: str) -> list[str]:
    return ["--finetune_strategy", "adapter", "--adapter_name", name, "--adapter_config", opts.adapter_config,
            "--adapter_reduction_factor", str(opts.adapter_reduction_factor)]


def row(method: str, a_before: float, a_after: float, b: float, seconds: float) -> dict:
    return {"method": method, "a_before": round(a_before, 2), "a_after": round(a_after, 2), "b": round(b, 2),
            "forgetting": round(a_before - a_after, 2), "seconds": round(seconds)}


def main() -> None:
    from transformers import AutoTokenizer

    from trainer.data.demo import write_product_sentiment_dataset, write_sentiment_dataset

    opts = options()
    flags, strategies = known_flags()
    skipped = {m: why for m in opts.methods if (why := available(m, flags, strategies))}
    for method, why in skipped.items():
        print(f"skipping {method}: {why}", flush=True)
    methods = [m for m in opts.methods if m not in skipped]
    start = time.perf_counter()
    if not methods:
        return report([], skipped, opts, 0.0)
    with tempfile.TemporaryDirectory() as temporary:
        work_dir = opts.work_dir or temporary
        os.makedirs(work_dir, exist_ok=True)
        tasks = {name: dict(zip(("train", "validation"), write(os.path.join(work_dir, "data", name))))
                 for name, write in ((TASK_A, write_sentiment_dataset), (TASK_B, write_product_sentiment_dataset))}
        base = pretrained_base(opts, tasks, work_dir)
        tokenizer = AutoTokenizer.from_pretrained(base)

        def evaluate(directory: str, adapter_a: str | None = None, adapter_b: str | None = None) -> tuple:
            """(accuracy on A with `adapter_a`, on B with `adapter_b`) of the model in `directory`."""
            on_a = accuracy(load_classifier(directory, adapter_a), tokenizer, tasks[TASK_A]["validation"],
                            opts.max_seq_length)
            on_b = accuracy(load_classifier(directory, adapter_b), tokenizer, tasks[TASK_B]["validation"],
                            opts.max_seq_length)
            return on_a, on_b

        rows = []
        full = [m for m in methods if m != "adapters"]
        if full:
            fisher = ["--save_fisher"] if any(m.startswith("ewc") for m in full) else []
            if fisher and opts.fisher_samples:
                fisher += ["--fisher_samples", str(opts.fisher_samples)]
            a_dir = classify(opts, work_dir, "A", base, tasks[TASK_A], *fisher)
            a_before, _ = evaluate(a_dir)
            for method in full:
                started = time.perf_counter()
                b_dir = classify(opts, work_dir, f"B-{method}", a_dir, tasks[TASK_B],
                                 *method_flags(method, opts, a_dir, tasks))
                a_after, b = evaluate(b_dir)
                rows.append(row(method, a_before, a_after, b, time.perf_counter() - started))
        if "adapters" in methods:
            started = time.perf_counter()
            a_dir = classify(opts, work_dir, "A-adapter", base, tasks[TASK_A], *adapter_flags(opts, TASK_A),
                             learning_rate=opts.adapter_learning_rate, epochs=opts.adapter_epochs)
            a_before, _ = evaluate(a_dir, TASK_A, TASK_A)
            b_dir = classify(opts, work_dir, "B-adapter", a_dir, tasks[TASK_B], *adapter_flags(opts, TASK_B),
                             learning_rate=opts.adapter_learning_rate, epochs=opts.adapter_epochs)
            a_after, b = evaluate(b_dir, TASK_A, TASK_B)
            rows.append(row("adapters", a_before, a_after, b, time.perf_counter() - started))
    report(rows, skipped, opts, time.perf_counter() - start)


def report(rows: list[dict], skipped: dict, opts, seconds: float) -> None:
    import torch

    settings = {key: value for key, value in vars(opts).items() if key not in ("work_dir", "json", "methods")}
    print(f"\ncontinual learning, A = {TASK_A} then B = {TASK_B} (validation accuracy, %), "
          f"{time.strftime('%Y-%m-%d %H:%M')}, {torch.get_num_threads()} threads, {seconds:.0f} s in all")
    print(f"{'method':12}{'A before':>10}{'A after':>10}{'B':>8}{'forgetting':>12}{'seconds':>9}")
    for r in rows:
        print(f"{r['method']:12}{r['a_before']:10.1f}{r['a_after']:10.1f}{r['b']:8.1f}{r['forgetting']:12.1f}"
              f"{r['seconds']:9.0f}")
    for method, why in skipped.items():
        print(f"{method:12}  skipped: {why}")
    print("forgetting = A before - A after, in points; seconds: the method's own runs and evaluations (adapters: "
          "both tasks; the others: B, from the shared A run)")
    with open(opts.json, "w") as handle:
        json.dump({"settings": settings, "results": rows, "skipped": skipped}, handle, indent=2)
    print(f"written to {opts.json}")


if __name__ == "__main__":
    main()
