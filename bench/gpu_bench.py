"""Benchmark: this engine against the transformers Trainer, eager, compiled and under DeepSpeed ZeRO-2, in one run.

Every case trains the same randomly initialised BERT (built from a config: no network) on the same generated text,
tokenized once by trainer.mlm's pipeline, with the same batch, sequence length, optimizer and precision, each in
its own process. Each case is timed over `--steps` optimizer steps after `--warmup` steps (compilation, allocator
and cache warm-up), with the device synchronised at both clock points. Printed per case: steady-state tokens/s,
MFU against the device's datasheet dense peak (trainer.engine.throughput; --peak_tflops overrides; on a CPU a measured
rate), peak device memory (peak RSS on a CPU), and the fraction of the timed wall time spent waiting for batches.

    python bench/gpu_bench.py --bf16                       # BERT-base on a GPU: see bench/gpu_bert_base.sh
    python bench/gpu_bench.py --smoke                      # tiny sizes on the CPU: checks the script end to end

MFU counts the FLOPs each side computes: the engine's masked-rows head and last layer (its `train_mfu`), the
Trainer's dense head. "dense-eq. MFU" counts every side as if dense (the same tokens at the Trainer's cost), so it
compares useful work per second.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "bench"))

import torch  # noqa: E402

CASES = ("engine_eager", "engine_compiled", "trainer_eager", "trainer_compiled", "engine_zero2", "trainer_zero2")
ZERO2 = os.path.join(REPO, "ds_configs", "zero2.json")


# ------------------------------------------------------------------------------------------------------ timing
class StepClock:
    """Wall time of the steps after warm-up, the device synchronised at both clock points, and the data wait."""

    def __init__(self, warmup: int):
        self.warmup, self.steps_begun = warmup, 0
        self.started = self.seconds = None
        self.data_wait = 0.0

    def step_begins(self) -> None:
        if self.steps_begun == self.warmup:
            synchronize()
            self.started = time.perf_counter()
        self.steps_begun += 1

    def waited(self, seconds: float) -> None:
        if self.started is not None:
            self.data_wait += seconds

    def stop(self) -> None:
        synchronize()
        self.seconds = time.perf_counter() - self.started


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def peak_memory_mib() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def result(clock: StepClock, opts, flops_per_token: float, dense_flops_per_token: float) -> dict:
    tokens_per_second = opts.steps * opts.batch_size * opts.seq_len / clock.seconds
    peak = opts.peak_tflops * 1e12
    return {"tokens_per_second": tokens_per_second, "mfu": tokens_per_second * flops_per_token / peak,
            "mfu_dense_equivalent": tokens_per_second * dense_flops_per_token / peak,
            "peak_memory_mib": peak_memory_mib(), "data_wait_fraction": clock.data_wait / clock.seconds}


# ----------------------------------------------------------------------------------------------------- this engine
def run_engine(directory: str, opts, compiled: bool, deepspeed: bool) -> dict:
    """trainer.mlm's task and engine, stepped by hand the way Engine.train steps (no evaluation, no saving)."""
    from trainer.engine.assembly import assemble
    from trainer.engine.jobs import job_config, start_job
    from trainer.engine.loop import Window
    from trainer.mlm import MLM_JOB, build_task

    corpus = os.path.join(directory, "corpus")
    argv = ["--model_name_or_path", os.path.join(directory, "model"), "--train_file", os.path.join(corpus, "train.txt"),
            "--validation_file", os.path.join(corpus, "validation.txt"), "--max_seq_length", str(opts.seq_len),
            "--per_device_train_batch_size", str(opts.batch_size), "--max_steps", str(opts.warmup + opts.steps),
            "--learning_rate", str(opts.learning_rate), "--weight_decay", "0.01", "--report_to", "none",
            "--probe_sentences", "", "--output_dir", os.path.join(directory, "engine-out"), "--overwrite_output_dir",
            "--seed", "0", "--peak_tflops", str(opts.peak_tflops), "--dataloader_num_workers", str(opts.workers)]
    argv += ["--bf16"] if opts.bf16 else []
    argv += ["--torch_compile", "--torch_compile_backend", opts.compile_backend,
             "--torch_compile_mode", opts.compile_mode] if compiled else []
    argv += ["--deepspeed", ZERO2] if deepspeed else []
    config, files, accelerator = start_job(MLM_JOB, job_config(MLM_JOB, argv))
    engine = assemble(config, build_task(config, files, accelerator), accelerator)
    batches, window, clock = engine.data.micro_batches(), Window(accelerator.device), StepClock(opts.warmup)
    for _ in range(opts.warmup + opts.steps):
        clock.step_begins()
        fetching = time.perf_counter()
        micro_batches = [next(batches)]
        clock.waited(time.perf_counter() - fetching)
        engine.optimizer_step(micro_batches, window)
    clock.stop()
    throughput = engine.parts.throughput
    measured = result(clock, opts, throughput.flops_per_token(opts.seq_len),
                      throughput.dense_flops_per_token(opts.seq_len))
    return {**measured, "zero_stage": zero_stage(accelerator)}


# ----------------------------------------------------------------------------------------- the transformers Trainer
def run_transformers_trainer(directory: str, opts, compiled: bool, deepspeed: bool) -> dict:
    from transformers import (AutoModelForMaskedLM, DataCollatorForLanguageModeling, Trainer, TrainerCallback,
                              TrainingArguments)

    from mlm_vs_trainer import blocks
    from trainer.engine.throughput import training_flops_per_token

    clock = StepClock(opts.warmup)

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == opts.warmup + opts.steps:
                clock.stop()

    class TimedTrainer(Trainer):
        def get_batch_samples(self, *args, **kwargs):  # once per optimizer step: the loop waits for its loader here
            clock.step_begins()
            fetching = time.perf_counter()
            batches = super().get_batch_samples(*args, **kwargs)
            clock.waited(time.perf_counter() - fetching)
            return batches

    tokenizer, data = blocks(directory, opts.seq_len)
    model = AutoModelForMaskedLM.from_pretrained(os.path.join(directory, "model"))
    extra = {}
    if compiled:
        extra.update(torch_compile=True, torch_compile_backend=opts.compile_backend,
                     torch_compile_mode=None if opts.compile_mode == "default" else opts.compile_mode)
    if deepspeed:
        extra["deepspeed"] = trainer_zero2_config()
    args = TrainingArguments(
        output_dir=os.path.join(directory, "hf-out"), per_device_train_batch_size=opts.batch_size,
        max_steps=opts.warmup + opts.steps, learning_rate=opts.learning_rate, warmup_steps=0, weight_decay=0.01,
        lr_scheduler_type="linear", bf16=opts.bf16, use_cpu=not torch.cuda.is_available() and not deepspeed,
        report_to="none", save_strategy="no", eval_strategy="no", logging_steps=opts.warmup + opts.steps,
        dataloader_num_workers=opts.workers, disable_tqdm=True, seed=0, **extra)
    trainer = TimedTrainer(model=model, args=args, train_dataset=data["train"], callbacks=[Clock()],
                           data_collator=DataCollatorForLanguageModeling(tokenizer, mlm_probability=0.15, seed=0))
    trainer.train()
    dense = training_flops_per_token(model, opts.seq_len)  # every position through the head
    return {**result(clock, opts, dense, dense), "zero_stage": zero_stage(trainer.accelerator)}


def zero_stage(accelerator):
    """The ZeRO stage a case really ran with (None: no DeepSpeed), so that a silent fallback cannot pass."""
    from trainer.distributed.launch import uses_deepspeed

    return accelerator.deepspeed_plugin.zero_stage if uses_deepspeed(accelerator) else None


def trainer_zero2_config() -> dict:
    """ds_configs/zero2.json as this engine resolves it on one process, "auto" left for the Trainer to fill. The
    optimizer and scheduler sections are dropped, so that the Trainer steps its own torch AdamW and schedule (as
    the engine does) and no DeepSpeed op needs compiling."""
    with open(ZERO2) as handle:
        config = json.load(handle)
    config.pop("optimizer"), config.pop("scheduler")
    config["zero_optimization"]["overlap_comm"] = False
    return config


# ----------------------------------------------------------------------------------------------------- driver
def child(case: str, directory: str, opts) -> None:
    side, variant = case.split("_")
    run = run_engine if side == "engine" else run_transformers_trainer
    print("RESULT " + json.dumps(run(directory, opts, compiled=variant == "compiled", deepspeed=variant == "zero2")),
          flush=True)


def measure(case: str, directory: str, argv: list[str], log_dir: str) -> dict:
    env = {**os.environ, "PYTHONPATH": REPO, "TRAINER_CACHE": os.path.join(directory, "cache"),
           "HF_HUB_OFFLINE": "1"}
    if case == "trainer_zero2":  # one process, no launcher: the variables DeepSpeed reads (the engine sets its own)
        from trainer.distributed.launch import free_port

        env.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    started = time.perf_counter()
    out = subprocess.run([sys.executable, __file__, "--case", case, "--fixture", directory, *argv], env=env,
                         capture_output=True, text=True)
    with open(os.path.join(log_dir, f"{case}.log"), "w") as handle:
        handle.write(out.stdout + "\n--- stderr\n" + out.stderr)
    lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
    if out.returncode != 0 or not lines:
        tail = (out.stderr.strip().splitlines() or ["(no output)"])[-1]
        return {"failed": f"exit {out.returncode}: {tail[:300]}"}
    measured = json.loads(lines[-1][len("RESULT "):])
    measured["process_seconds"] = time.perf_counter() - started
    measured["destroy_process_group_warning"] = "destroy_process_group() was not called" in out.stderr
    return measured


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--vocab_size", type=int, default=30522)
    parser.add_argument("--seq_len", type=int, default=128)
    parser.add_argument("--batch_size", type=int, default=128)
    parser.add_argument("--warmup", type=int, default=30, help="untimed steps first (compilation happens here)")
    parser.add_argument("--steps", type=int, default=100, help="timed steps")
    parser.add_argument("--learning_rate", type=float, default=1e-4)
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--workers", type=int, help="data-loader workers for both sides (default: the engine's "
                                                    "default for this device, given to the Trainer too)")
    parser.add_argument("--compile_backend", default="inductor")
    parser.add_argument("--compile_mode", default="default",
                        choices=["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"])
    parser.add_argument("--peak_tflops", type=float, help="default: the datasheet dense peak (measured on a CPU)")
    parser.add_argument("--cases", nargs="*", default=list(CASES), choices=CASES)
    parser.add_argument("--output", help="also write the results as JSON here (and each case's log beside it)")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny sizes (2 layers x 64, 2k vocabulary, batch 8 x 32, 2 + 3 steps, compile with "
                             "aot_eager): checks the script end to end on a CPU in minutes; its figures mean nothing")
    parser.add_argument("--case", choices=CASES, help=argparse.SUPPRESS)
    parser.add_argument("--fixture", help=argparse.SUPPRESS)
    opts = parser.parse_args()
    if opts.case:
        return child(opts.case, opts.fixture, opts)
    if opts.smoke:
        opts.layers, opts.hidden, opts.vocab_size, opts.seq_len, opts.batch_size = 2, 64, 2000, 32, 8
        opts.warmup, opts.steps, opts.compile_backend = 2, 3, "aot_eager"
    from mlm_vs_trainer import blocks, build_fixture
    from trainer.data.batches import loader_workers
    from trainer.engine.throughput import device_peak, precision_name

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    precision = precision_name(opts.bf16, False, tf32=device.type == "cuda")
    peak = device_peak(device, precision, opts.peak_tflops)
    opts.peak_tflops = peak.flops / 1e12
    opts.workers = loader_workers(None, device) if opts.workers is None else opts.workers
    passthrough = ["--layers", str(opts.layers), "--hidden", str(opts.hidden), "--vocab_size", str(opts.vocab_size),
                   "--seq_len", str(opts.seq_len), "--batch_size", str(opts.batch_size), "--warmup", str(opts.warmup),
                   "--steps", str(opts.steps), "--learning_rate", str(opts.learning_rate),
                   "--workers", str(opts.workers), "--compile_backend", opts.compile_backend,
                   "--compile_mode", opts.compile_mode, "--peak_tflops", str(opts.peak_tflops)]
    passthrough += ["--bf16"] if opts.bf16 else []
    log_dir = os.path.dirname(os.path.abspath(opts.output)) if opts.output else tempfile.mkdtemp(prefix="bench-logs-")
    os.makedirs(log_dir, exist_ok=True)
    with tempfile.TemporaryDirectory() as directory:
        build_fixture(directory, opts.layers, opts.hidden, opts.vocab_size)
        blocks(directory, opts.seq_len)  # tokenize once, outside every timing
        results = {}
        for case in opts.cases:
            results[case] = measure(case, directory, passthrough, log_dir)
            print(f"{case}: {summary(results[case])}", flush=True)
    header = describe(opts, device, peak.source)
    report = table(results, header)
    print("\n" + report)
    if opts.output:
        with open(opts.output, "w") as handle:
            json.dump({"setup": header, "options": vars(opts), "results": results}, handle, indent=2)


def summary(measured: dict) -> str:
    if "failed" in measured:
        return "FAILED " + measured["failed"]
    return f"{measured['tokens_per_second']:.0f} tokens/s, MFU {measured['mfu']:.1%}"


def describe(opts, device: torch.device, peak_source: str) -> str:
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU ({os.cpu_count()} cores)"
    versions = f"torch {torch.__version__}" + (f", CUDA {torch.version.cuda}" if device.type == "cuda" else "")
    return (f"MLM, BERT {opts.layers}x{opts.hidden}, vocabulary {opts.vocab_size} (padded to a multiple of 64), batch "
            f"{opts.batch_size} x {opts.seq_len}, {'bf16' if opts.bf16 else 'fp32'}, {opts.warmup} warm-up + "
            f"{opts.steps} timed steps, {opts.workers} loader workers, compile {opts.compile_backend}/"
            f"{opts.compile_mode}; {name}, {versions}, {time.strftime('%Y-%m-%d %H:%M')}\n"
            f"MFU against {peak_source}")


def table(results: dict, header: str) -> str:
    lines = [header, f"{'case':18}{'tokens/s':>11}{'MFU':>8}{'dense-eq. MFU':>15}{'peak mem MiB':>14}"
                     f"{'data wait':>11}{'ZeRO':>6}"]
    for case, measured in results.items():
        if "failed" in measured:
            lines.append(f"{case:18}FAILED {measured['failed']}")
            continue
        lines.append(f"{case:18}{measured['tokens_per_second']:11.0f}{measured['mfu']:8.1%}"
                     f"{measured['mfu_dense_equivalent']:15.1%}{measured['peak_memory_mib']:14.0f}"
                     f"{measured['data_wait_fraction']:11.1%}{str(measured['zero_stage'] or '-'):>6}")
    speed = {case: m["tokens_per_second"] for case, m in results.items() if "failed" not in m}
    for ours, theirs in (("engine_eager", "trainer_eager"), ("engine_eager", "trainer_compiled"),
                         ("engine_compiled", "trainer_compiled"), ("engine_compiled", "engine_eager"),
                         ("engine_zero2", "engine_eager"), ("trainer_zero2", "trainer_eager")):
        if ours in speed and theirs in speed:
            lines.append(f"{ours} / {theirs}: {speed[ours] / speed[theirs]:.2f}x")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
