"""Benchmark: --streaming against map-style data for trainer.mlm (issue 22): start-up, steady state, resume.

Corpora of generated reviews (10 MB, 100 MB, 1 GB; 10 MB .txt shards in a directory for the stream, one file for
map-style) are written to a temporary directory and deleted at the end. Every run is its own `python -m
trainer.mlm` process (a 2 x 128 BERT, sequences of 128, batch 16, the bench tokenizer trained once on 1 MB), so
its peak RSS (RUSAGE_CHILDREN) is its own.

- start-up: seconds from the process start to the log line of optimizer step 1 (torch import and the model build
  included: the same on both sides), and peak RSS; map-style data is capped at --map_style_cap_mb (it tokenizes
  the whole corpus first: about 1 MB/s on 2 cores);
- steady state: tokens/s of the last logging window of a --steady_steps run on the first 2 MB of the corpus,
  map-style against streaming with 0 and 1 loader workers;
- resume: seconds to the first optimizer step after a resume from the checkpoint of step 10, and from the same
  checkpoint with every lane moved 90% into its part of the 1 GB corpus and the step set to 1,000,000 (what a
  resume deep into a long run has to seek; a real run that long would take days here).

    python bench/streaming.py                       # all of it (about 10 minutes on 2 shared cores)
"""
from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
SHARD_MB = 10
STEADY_LINES = 12_000  # about 2 MB
MODEL = ["--model_type", "bert", "--config_overrides",
         "hidden_size=128,num_hidden_layers=2,num_attention_heads=2,intermediate_size=256,max_position_embeddings=128"]
FIRST_STEP = re.compile(r"step 1: train_loss")


def write_shards(directory: str, megabytes: int, template: str) -> list[str]:
    """`megabytes` MB of text as SHARD_MB-MB shards: copies of `template` (hard links would share page cache)."""
    os.makedirs(directory, exist_ok=True)
    shards = []
    for index in range(max(1, megabytes // SHARD_MB)):
        shards.append(os.path.join(directory, f"part-{index:04d}.txt"))
        shutil.copyfile(template, shards[-1])
    return shards


def job_argv(train: str, validation: str, tokenizer: str, output_dir: str, steps: int, *extra) -> list[str]:
    return ["--train_file", train, "--validation_file", validation, "--tokenizer_name", tokenizer, *MODEL,
            "--max_seq_length", "128", "--per_device_train_batch_size", "16", "--max_steps", str(steps),
            "--learning_rate", "1e-4", "--logging_steps", "1", "--report_to", "none", "--probe_sentences", "",
            "--max_eval_samples", "32", "--output_dir", output_dir, "--peak_tflops", "1", *extra]


def timed_run(argv: list[str], env: dict, timeout: float) -> dict:
    """Seconds to the first optimizer step (None: not reached within `timeout`) and peak RSS of one job process."""
    started = time.perf_counter()
    process, watchdog = start(argv, env, timeout)
    first_step = None
    try:
        for line in process.stdout:
            if first_step is None and FIRST_STEP.search(line):
                first_step = time.perf_counter() - started
    finally:
        watchdog.cancel()
        process.kill()
        process.wait()
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024  # the largest child so far: see main
    return {"first_step_s": first_step, "peak_rss_mib": peak}


def start(argv: list[str], env: dict, timeout: float):
    """The job process (its log on `stdout`) and a timer that kills it after `timeout` seconds."""
    process = subprocess.Popen([sys.executable, "-m", "trainer.mlm", *argv], env=env, cwd=REPO,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    watchdog = threading.Timer(timeout, process.kill)
    watchdog.start()
    return process, watchdog


def isolated(function, env: dict, *args):
    """Run `function(*args)` in a fresh interpreter with the environment `env`, so that RUSAGE_CHILDREN is that
    run's alone."""
    code = (f"import json, sys; sys.path.insert(0, {REPO!r}); sys.path.insert(0, {os.path.dirname(__file__)!r}); "
            f"import streaming as bench; print(json.dumps(bench.{function.__name__}(*json.loads("
            f"{json.dumps(args)!r}))))")
    output = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                            check=True).stdout
    return json.loads(output.strip().splitlines()[-1])


def startup(train: str, validation: str, tokenizer: str, output_dir: str, streaming: bool, timeout: float) -> dict:
    extra = ["--streaming"] if streaming else []
    return timed_run(job_argv(train, validation, tokenizer, output_dir, 2, *extra, "--overwrite_output_dir"),
                     dict(os.environ), timeout)


def steady_state(train: str, validation: str, tokenizer: str, output_dir: str, env: dict, steps: int,
                 extra: list) -> float:
    argv = job_argv(train, validation, tokenizer, output_dir, steps, "--logging_steps", str(steps // 2),
                    "--overwrite_output_dir", *extra)
    subprocess.run([sys.executable, "-m", "trainer.mlm", *argv], env=env, cwd=REPO, check=True,
                   capture_output=True)
    with open(os.path.join(output_dir, "log_history.jsonl")) as handle:
        windows = [record for record in map(json.loads, handle) if "train_tokens_per_second" in record]
    return windows[-1]["train_tokens_per_second"]


def deepen(checkpoint: str, corpus_bytes: int, step: int) -> None:
    """Move every lane of `checkpoint` 90% into its part of a corpus of `corpus_bytes`, at optimizer step `step`."""
    path = os.path.join(checkpoint, "trainer_state.json")
    with open(path) as handle:
        state = json.load(handle)
    lanes = state["states"]["data"]["lanes"]
    for slot, position in lanes.items():
        start, end = int(slot) * corpus_bytes // len(lanes), (int(slot) + 1) * corpus_bytes // len(lanes)
        lanes[slot] = [0, start + (end - start) * 9 // 10, 0, 0, step, step * 128]  # blocks of 128 tokens
    state["step"] = step
    with open(path, "w") as handle:
        json.dump(state, handle)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes_mb", type=int, nargs="+", default=[10, 100, 1000])
    parser.add_argument("--map_style_cap_mb", type=int, default=100, help="larger corpora: streaming only")
    parser.add_argument("--timeout", type=float, default=240, help="seconds a start-up run may take")
    parser.add_argument("--steady_steps", type=int, default=60)
    parser.add_argument("--parts", nargs="+", default=["startup", "steady", "resume"],
                        choices=["startup", "steady", "resume"])
    opts = parser.parse_args()

    from trainer.data.demo import train_wordpiece_tokenizer
    from preprocess import write_corpus

    work = tempfile.mkdtemp(prefix="bench-streaming-")
    env = {**os.environ, "PYTHONPATH": REPO, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
           "HF_HUB_OFFLINE": "1", "TRAINER_CACHE": os.path.join(work, "cache"),
           "HF_DATASETS_CACHE": os.path.join(work, "datasets")}
    try:
        template = os.path.join(work, "template.txt")
        write_corpus(template, SHARD_MB)
        validation = os.path.join(work, "validation.txt")
        with open(template) as source, open(validation, "w") as handle:
            handle.writelines(line for _, line in zip(range(2000), source))
        tokenizer = os.path.join(work, "tokenizer")
        train_wordpiece_tokenizer([validation], vocab_size=8000, output_dir=tokenizer)
        out = os.path.join(work, "out")
        if "startup" in opts.parts:
            startup_table(opts, work, template, validation, tokenizer, out, env)
        largest = os.path.join(work, f"corpus-{max(opts.sizes_mb)}")
        if not os.path.isdir(largest):
            write_shards(largest, max(opts.sizes_mb), template)
        if "steady" in opts.parts:  # on the first 2 MB: the map-style side tokenizes it all first
            small = os.path.join(work, "steady.txt")
            with open(template) as source, open(small, "w") as handle:
                handle.writelines(line for _, line in zip(range(STEADY_LINES), source))
            mapped = steady_state(small, validation, tokenizer, out, env, opts.steady_steps, [])
            streamed = [steady_state(small, validation, tokenizer, out, env, opts.steady_steps,
                                     ["--streaming", "--dataloader_num_workers", str(workers)]) for workers in (0, 1)]
            print(f"\nsteady state, tokens/s: map-style {mapped:.0f}; streaming, 0 workers {streamed[0]:.0f} "
                  f"({streamed[0] / mapped:.2f}x); 1 worker {streamed[1]:.0f} ({streamed[1] / mapped:.2f}x)")
        if "resume" in opts.parts:
            resume_table(opts, work, largest, validation, tokenizer, env)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def startup_table(opts, work, template, validation, tokenizer, out, env) -> None:
    print("| corpus | streaming: s to step 1 | peak RSS MiB | map-style: s to step 1 | peak RSS MiB |")
    print("|---|---|---|---|---|")
    for megabytes in opts.sizes_mb:
        shards = write_shards(os.path.join(work, f"corpus-{megabytes}"), megabytes, template)
        stream = isolated(startup, env, os.path.dirname(shards[0]), validation, tokenizer, out, True, opts.timeout)
        row = [f"{megabytes} MB", fmt(stream["first_step_s"]), f"{stream['peak_rss_mib']:.0f}"]
        if megabytes <= opts.map_style_cap_mb:
            single = os.path.join(work, f"single-{megabytes}.txt")
            with open(single, "wb") as handle:
                for shard in shards:
                    with open(shard, "rb") as part:
                        shutil.copyfileobj(part, handle)
            mapped = isolated(startup, env, single, validation, tokenizer, out, False, opts.timeout)
            row += [fmt(mapped["first_step_s"], opts.timeout), f"{mapped['peak_rss_mib']:.0f}"]
            os.remove(single)
        else:
            row += ["not run (capped)", "-"]
        print("| " + " | ".join(row) + " |", flush=True)
        if megabytes != max(opts.sizes_mb):
            shutil.rmtree(os.path.dirname(shards[0]))


def resume_table(opts, work, largest, validation, tokenizer, env) -> None:
    resume_dir = os.path.join(work, "resume")
    subprocess.run([sys.executable, "-m", "trainer.mlm", *job_argv(
        largest, validation, tokenizer, resume_dir, 10, "--streaming", "--save_steps", "10")], env=env,
        cwd=REPO, check=True, capture_output=True)
    deep_dir = os.path.join(work, "resume-deep")
    shutil.copytree(resume_dir, deep_dir)
    corpus_bytes = sum(os.path.getsize(os.path.join(largest, name)) for name in os.listdir(largest))
    deepen(os.path.join(deep_dir, "checkpoint-10"), corpus_bytes, 1_000_000)
    shutil.move(os.path.join(deep_dir, "checkpoint-10"), os.path.join(deep_dir, "checkpoint-1000000"))
    fresh = timed_run(job_argv(largest, validation, tokenizer, os.path.join(work, "fresh"), 12, "--streaming"),
                      env, opts.timeout)["first_step_s"]
    near = resume_latency(largest, validation, tokenizer, resume_dir, env, 12, opts.timeout)
    deep = resume_latency(largest, validation, tokenizer, deep_dir, env, 1_000_002, opts.timeout)
    print(f"\nresume, s to the first step after it: from step 10 {near:.1f}; from step 1,000,000 (lanes 90% "
          f"into {corpus_bytes / 1e9:.2f} GB) {deep:.1f} ({deep / near:.2f}x); a fresh start {fresh:.1f}")


def resume_latency(train, validation, tokenizer, output_dir, env, steps, timeout) -> float:
    """Seconds from the process start to the first optimizer step after a resume (step N+1's log line)."""
    started = time.perf_counter()
    process, watchdog = start(job_argv(train, validation, tokenizer, output_dir, steps, "--streaming"), env, timeout)
    try:
        resumed = False
        for line in process.stdout:
            resumed = resumed or "resumed from" in line
            if resumed and re.search(r"step \d+: train_loss", line):
                return time.perf_counter() - started
        raise RuntimeError(f"no step after the resume of {output_dir}")
    finally:
        watchdog.cancel()
        process.kill()
        process.wait()


def fmt(seconds, timeout=None) -> str:
    return f"{seconds:.1f}" if seconds is not None else f"> {timeout:.0f} (timed out)"


if __name__ == "__main__":
    main()
