"""CPU: peak host memory (RSS) of each process while trainer.clm builds a few-hundred-million-parameter Llama and
`prepare` shards it, from scratch and from a checkpoint, at 1 and 2 processes under DDP, FSDP2 and ZeRO-3.

Each run is the job itself up to and including `assembly.prepared_model`, then it stops (no data loader, no step):
`--worker` wraps the job's `start_job` and `run_job` to read this process's peak RSS (getrusage) after start-up, after
the build (the job's task, tokenized data included), under ZeRO-3 after the partitioning before `prepare`, and after
`prepare` (under ZeRO-3 it also allocates the optimizer's fp32 partitions), into one JSON file per process.

    python bench/construction_memory.py                     # 24 x 1024, MLP 2816: 324M parameters, ~5 min on 2 cores
    python bench/construction_memory.py --layers 2 --hidden 64 --intermediate 128   # a smoke run
    python bench/construction_memory.py --launches "1 process" "FSDP2 x2"          # some of the launches
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PEAKS_DIR = "CONSTRUCTION_MEMORY_DIR"  # where each process writes rank-<r>.json
LAUNCHES = {  # name: (processes, launcher prefix or None for a plain process, extra job flags)
    "1 process": (1, None, []),
    "DDP x2": (2, "accelerate:cpu_ddp.yaml", []),
    "FSDP2 x2": (2, "accelerate:cpu_fsdp2.yaml", []),
    "ZeRO-3 x2": (2, "torchrun", ["--deepspeed", os.path.join(REPO, "ds_configs", "zero3.json"),
                                 "--lr_scheduler_type", "linear"]),  # the scheduler zero3.json names
}


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def worker(argv: list[str]) -> None:
    """The clm job, stopped after `prepare`, with this process's peak RSS at each phase printed."""
    sys.path.insert(0, REPO)
    from trainer import clm
    from trainer.distributed import construction
    from trainer.engine import assembly, jobs

    peaks = {}
    start_job, partition = jobs.start_job, construction.partitioned_from_first_process

    def started(job, config):
        started_job = start_job(job, config)
        peaks["start"] = peak_mib()
        return started_job

    def built(job, config, files, task, accelerator):
        peaks["build"] = peak_mib()
        assembly.prepared_model(config, task, accelerator)
        peaks["prepare"] = peak_mib()
        rank = accelerator.process_index
        with open(os.path.join(os.environ[PEAKS_DIR], f"rank-{rank}.json"), "w") as handle:
            json.dump({"rank": rank, **peaks}, handle)
        return {}

    def partitioned(accelerator, model):
        partition(accelerator, model)
        peaks["partitioned"] = peak_mib()

    jobs.start_job, jobs.run_job, construction.partitioned_from_first_process = started, built, partitioned
    clm.main(argv)


def launcher(kind: str | None, processes: int) -> list[str]:
    if kind is None:
        return [sys.executable]
    port = ["--main_process_port" if kind.startswith("accelerate") else "--master_port", str(free_port())]
    if kind == "torchrun":
        return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes), *port]
    yaml = os.path.join(REPO, "launch", "accelerate", kind.split(":")[1])
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", yaml, *port]


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def measure(name: str, job_args: list[str], directory: str) -> list[dict]:
    processes, kind, extra = LAUNCHES[name]
    peaks = tempfile.mkdtemp(dir=directory)
    command = [*launcher(kind, processes), os.path.abspath(__file__), "--worker", *job_args, *extra,
               "--output_dir", os.path.join(peaks, "run")]
    # A fixed mmap threshold, as bench/memory_plan.py: glibc's default one rises as large blocks are freed, after which
    # freed tensors stay in its heap and RSS counts them.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": REPO, "HF_HUB_OFFLINE": "1", PEAKS_DIR: peaks,
           "MALLOC_MMAP_THRESHOLD_": "65536"}
    result = subprocess.run(command, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"{name} failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return [json.load(open(os.path.join(peaks, f"rank-{rank}.json"))) for rank in range(processes)]


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        return worker(sys.argv[2:])
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=24)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--intermediate", type=int, default=2816)
    p.add_argument("--launches", nargs="+", choices=list(LAUNCHES), default=list(LAUNCHES))
    opts = p.parse_args()
    model = ["--model_type", "llama", "--config_overrides",
             f"hidden_size={opts.hidden},intermediate_size={opts.intermediate},num_hidden_layers={opts.layers},"
             f"num_attention_heads=8,num_key_value_heads=8"]
    common = ["--block_size", "64", "--per_device_train_batch_size", "1", "--max_steps", "1", "--report_to", "none",
              "--max_eval_samples", "2", "--probe_prompts", ""]
    with tempfile.TemporaryDirectory() as directory:
        checkpoint = os.path.join(directory, "checkpoint")
        subprocess.run([sys.executable, "-m", "trainer.clm", *model, *common, "--output_dir", checkpoint],
                       env={**os.environ, "PYTHONPATH": REPO, "HF_HUB_OFFLINE": "1"}, check=True, capture_output=True)
        size = os.path.getsize(os.path.join(checkpoint, "model.safetensors")) / 2 ** 20
        print(f"model: {opts.layers} x {opts.hidden} Llama, {size:.0f} MiB in fp32\n")
        print("| launch | model | rank | start-up | after build | ZeRO-3: after partitioning | after prepare |")
        print("|---|---|---|---|---|---|---|")
        for source, args in (("scratch", model), ("checkpoint", ["--model_name_or_path", checkpoint])):
            for name in opts.launches:
                for line in measure(name, [*args, *common], directory):
                    partitioned = f"{line['partitioned']:.0f} MiB" if "partitioned" in line else ""
                    print(f"| {name} | {source} | {line['rank']} | {line['start']:.0f} MiB | {line['build']:.0f} MiB "
                          f"| {partitioned} | {line['prepare']:.0f} MiB |", flush=True)


if __name__ == "__main__":
    main()
