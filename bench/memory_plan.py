"""The memory plan (`--estimate_memory`, trainer/engine/memory_plan.py) against the measured peak, on the CPU.

Each configuration trains trainer.clm for a few steps on the embedded corpus, in its own process(es) (peak RSS is a
per-process high-water mark). Inside the job, just before the task is built, the process records the plan for its
started backend (the one the start-up log states) and its resident memory; at the end, its peak RSS. What the plan
covers is what training adds to the process: peak RSS minus the RSS before the model was built (torch, Python and
the started processes are in both). The data (the embedded corpus, a few MB) is loaded in between, so it counts on
the measured side only.

Usage: python bench/memory_plan.py [--only NAME ...] [--steps 3]
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import resource
import subprocess
import sys
import tempfile

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GPT2 = ["--model_type", "gpt2", "--config_overrides", "n_embd=256,n_layer=4,n_head=4,n_positions=256"]
LLAMA = ["--model_type", "llama", "--config_overrides",
         "hidden_size=256,intermediate_size=688,num_hidden_layers=8,num_attention_heads=4,num_key_value_heads=2,"
         "max_position_embeddings=256"]
BATCH = ["--block_size", "256", "--per_device_train_batch_size", "8"]
# name -> (processes, launcher kind, job flags)
CONFIGURATIONS = {
    "gpt2-dropout": (1, "python", [*GPT2, *BATCH]),
    "llama": (1, "python", [*LLAMA, *BATCH]),
    "llama-checkpointing": (1, "python", [*LLAMA, *BATCH, "--gradient_checkpointing"]),
    "llama-bf16": (1, "python", [*LLAMA, *BATCH, "--bf16"]),
    "llama-ddp-2": (2, "torchrun", [*LLAMA, *BATCH]),
    "llama-zero3-2": (2, "torchrun", [*LLAMA, *BATCH, "--deepspeed", os.path.join(REPO_ROOT, "ds_configs",
                                                                                 "zero3.json")]),
}


def current_rss() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def child(result_dir: str, argv: list[str]) -> None:
    """Run the job, recording the plan and RSS before the task is built, and the peak RSS after."""
    from dataclasses import replace

    from trainer.clm import CLM_JOB
    from trainer.engine import jobs
    from trainer.engine.memory_plan import accelerator_backend

    measured = {}

    def build_task(config, files, accelerator):
        plan = jobs.job_memory_plan(CLM_JOB, config, accelerator_backend(accelerator), accelerator.num_processes,
                                    accelerator.device.type)
        measured.update(plan={**plan.parts(), "peak": plan.peak}, before=current_rss())
        return CLM_JOB.build_task(config, files, accelerator)

    jobs.run(replace(CLM_JOB, build_task=build_task), argv)
    measured["peak_rss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    with open(os.path.join(result_dir, f"rank-{os.environ.get('RANK', '0')}.json"), "w") as handle:
        json.dump(measured, handle)


def run_configuration(name: str, steps: int, tokenizer_dir: str) -> list[dict]:
    processes, launcher, flags = CONFIGURATIONS[name]
    with tempfile.TemporaryDirectory() as scratch:
        results = os.path.join(scratch, "results")
        os.makedirs(results)
        job = ["--tokenizer_name", tokenizer_dir, *flags, "--max_steps", str(steps), "--eval_steps", "1000",
               "--max_eval_samples", "16", "--per_device_eval_batch_size", "8", "--logging_steps", "1",
               "--lr_scheduler_type", "linear", "--probe_prompts", "", "--report_to", "none",
               "--output_dir", os.path.join(scratch, "out")]
        start = [sys.executable] if launcher == "python" else [
            sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes)]
        # glibc keeps freed blocks below its (rising) mmap threshold in the heap, so RSS would count freed tensors:
        # a fixed 64 KiB threshold returns every tensor's pages on free, and RSS follows what is alive.
        env = {**os.environ, "PYTHONPATH": REPO_ROOT, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
               "MALLOC_MMAP_THRESHOLD_": "65536"}
        done = subprocess.run([*start, os.path.abspath(__file__), "--child", results, "--", *job], env=env,
                              cwd=REPO_ROOT, capture_output=True, text=True)
        if done.returncode:
            raise SystemExit(f"{name} exited {done.returncode}:\n{done.stderr[-4000:]}")
        return [json.load(open(path)) for path in sorted(glob.glob(os.path.join(results, "rank-*.json")))]


def tokenizer(directory: str) -> str:
    from trainer.data.demo import train_byte_level_bpe_tokenizer, write_mlm_corpus

    train, _ = write_mlm_corpus(os.path.join(directory, "corpus"))
    train_byte_level_bpe_tokenizer([train], vocab_size=8000, output_dir=os.path.join(directory, "tokenizer"))
    return os.path.join(directory, "tokenizer")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--only", nargs="*", choices=list(CONFIGURATIONS))
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--child")
    args, job = parser.parse_known_args()
    if args.child:
        child(args.child, job[1:] if job[:1] == ["--"] else job)
        return
    mib = 2 ** 20
    print(f"{'configuration':<22}{'rank':>5}{'plan MiB':>10}{'measured MiB':>14}{'measured / plan':>17}   "
          f"plan parts MiB")
    with tempfile.TemporaryDirectory() as scratch:
        tokenizer_dir = tokenizer(scratch)
        for name in args.only or CONFIGURATIONS:
            for rank, result in enumerate(run_configuration(name, args.steps, tokenizer_dir)):
                plan, grown = result["plan"], result["peak_rss"] - result["before"]
                parts = ", ".join(f"{key} {value / mib:.0f}" for key, value in plan.items() if key != "peak" and value)
                print(f"{name:<22}{rank:>5}{plan['peak'] / mib:>10.0f}{grown / mib:>14.0f}"
                      f"{grown / plan['peak']:>16.2f}x   {parts}", flush=True)


if __name__ == "__main__":
    main()
