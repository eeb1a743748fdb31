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

Against the transformers `Trainer` (`run_mlm.py --streaming`, written in bench/streaming_trainer.py; same BERT,
batch, sequence length and shards), each figure beside ours measured in the same invocation:
- trainer_startup: seconds to optimizer step 1 and peak RSS at each corpus size;
- trainer_resume: seconds to the first optimizer step after a resume from step N (--resume_steps), ours from
  checkpoint-10 deepened as above, the Trainer's from its checkpoint-10 with global_step set to N: it replays N
  batches through the stream before the step, so each resume may take --resume_timeout before it is "> cap".

    python bench/streaming.py                       # startup, steady, resume (about 10 minutes on 2 shared cores)
    python bench/streaming.py --parts trainer_startup trainer_resume     # the Trainer's side (about 15 minutes)
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

from preprocess import BLOCK  # noqa: E402  (bench/preprocess.py: the sequence length, run_mlm's group_texts)
SHARD_MB = 10
STEADY_LINES = 12_000  # about 2 MB
BATCH = 16
BERT = dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=2, intermediate_size=256,
            max_position_embeddings=BLOCK)
MODEL = ["--model_type", "bert", "--config_overrides", ",".join(f"{key}={value}" for key, value in BERT.items())]
SHUFFLE_BUFFER = 1000  # trainer.mlm's default --shuffle_buffer_size (documents); the Trainer side's buffer
TRAINER_STEP_LINE = r"optimizer step (\d+) done"  # printed by bench/streaming_trainer.py's callback
# Each job: its process without arguments, and its log line of an optimizer step (the step number as group 1).
JOBS = {"ours": ([sys.executable, "-m", "trainer.mlm"], re.compile(r"step (\d+): train_loss")),
        "trainer": ([sys.executable, os.path.join(REPO, "bench", "streaming_trainer.py")],
                    re.compile(TRAINER_STEP_LINE))}


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
            "--max_seq_length", str(BLOCK), "--per_device_train_batch_size", str(BATCH), "--max_steps", str(steps),
            "--learning_rate", "1e-4", "--logging_steps", "1", "--report_to", "none", "--probe_sentences", "",
            "--max_eval_samples", "32", "--output_dir", output_dir, "--peak_tflops", "1", *extra]


def trainer_argv(train_dir: str, tokenizer: str, output_dir: str, steps: int, *extra) -> list[str]:
    return ["--train_dir", train_dir, "--tokenizer", tokenizer, "--output_dir", output_dir, "--max_steps", str(steps),
            *extra]


def timed_run(job: str, argv: list[str], env: dict, timeout: float) -> dict:
    """Seconds to the first optimizer step (None: not reached within `timeout`) and peak RSS of one process of
    `job` (a key of JOBS)."""
    started = time.perf_counter()
    process, watchdog = start(job, argv, env, timeout)
    first_step = None
    try:
        for line in process.stdout:
            step = JOBS[job][1].search(line)
            if first_step is None and step and step.group(1) == "1":
                first_step = time.perf_counter() - started
    finally:
        watchdog.cancel()
        process.kill()
        process.wait()
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024  # the largest child so far: see main
    return {"first_step_s": first_step, "peak_rss_mib": peak}


def start(job: str, argv: list[str], env: dict, timeout: float):
    """The process of `job` (its log on `stdout`) and a timer that kills it after `timeout` seconds."""
    process = subprocess.Popen([*JOBS[job][0], *argv], env=env, cwd=REPO,
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
    return timed_run("ours", job_argv(train, validation, tokenizer, output_dir, 2, *extra, "--overwrite_output_dir"),
                     dict(os.environ), timeout)


def trainer_startup(train_dir: str, tokenizer: str, output_dir: str, timeout: float) -> dict:
    """The Trainer's `run_mlm.py --streaming` start-up (`output_dir` must hold no checkpoint: it would resume)."""
    shutil.rmtree(output_dir, ignore_errors=True)
    return timed_run("trainer", trainer_argv(train_dir, tokenizer, output_dir, 2), dict(os.environ), timeout)


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
        lanes[slot] = [0, start + (end - start) * 9 // 10, 0, 0, step, step * BLOCK]  # a block per lane per step
    state["step"] = step
    # The loop's own counters: without them the job would resume its data deep in the corpus but count from step 10.
    state["states"]["train_state"].update(step=step, tokens_seen=step * BATCH * BLOCK)
    with open(path, "w") as handle:
        json.dump(state, handle)


def set_global_step(checkpoint: str, step: int) -> None:
    """Make a `Trainer` checkpoint one of optimizer step `step`. transformers 5.24 resumes a stream without a length
    (max_steps > step) at epoch 0 and skips global_step x gradient_accumulation_steps batches (`_init_training_state`,
    `skip_first_batches`): the same replay as a checkpoint really written at that step."""
    path = os.path.join(checkpoint, "trainer_state.json")
    with open(path) as handle:
        state = json.load(handle)
    state["global_step"] = step
    with open(path, "w") as handle:
        json.dump(state, handle)


def deeper_copy(output_dir: str, step: int, edit) -> str:
    """A copy of `output_dir` whose checkpoint-10 became checkpoint-`step` by `edit(checkpoint, step)`."""
    copy = f"{output_dir}-{step}"
    shutil.copytree(output_dir, copy)
    checkpoint = os.path.join(copy, f"checkpoint-{step}")
    shutil.move(os.path.join(copy, "checkpoint-10"), checkpoint)
    edit(checkpoint, step)
    return copy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes_mb", type=int, nargs="+", default=[10, 100, 1000])
    parser.add_argument("--map_style_cap_mb", type=int, default=100, help="larger corpora: streaming only")
    parser.add_argument("--timeout", type=float, default=240, help="seconds a start-up run may take")
    parser.add_argument("--steady_steps", type=int, default=60)
    parser.add_argument("--resume_steps", type=int, nargs="+", default=[10, 1000, 10_000],
                        help="trainer_resume: the steps resumed from")
    parser.add_argument("--resume_timeout", type=float, default=900,
                        help="trainer_resume: seconds a resume may take before it is reported as '> cap'")
    parser.add_argument("--parts", nargs="+", default=["startup", "steady", "resume"],
                        choices=["startup", "steady", "resume", "trainer_startup", "trainer_resume"])
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
        if "trainer_startup" in opts.parts:
            trainer_startup_table(opts, work, template, validation, tokenizer, out, env)
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
        if "trainer_resume" in opts.parts:
            trainer_resume_table(opts, work, largest, validation, tokenizer, env)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def corpora(opts, work: str, template: str):
    """(megabytes, directory of shards) for each --sizes_mb; each is deleted after its rows but the largest, which
    the resume parts read."""
    for megabytes in opts.sizes_mb:
        directory = os.path.join(work, f"corpus-{megabytes}")
        if not os.path.isdir(directory):
            write_shards(directory, megabytes, template)
        yield megabytes, directory
        if megabytes != max(opts.sizes_mb):
            shutil.rmtree(directory)


def startup_table(opts, work, template, validation, tokenizer, out, env) -> None:
    print("| corpus | streaming: s to step 1 | peak RSS MiB | map-style: s to step 1 | peak RSS MiB |")
    print("|---|---|---|---|---|")
    for megabytes, directory in corpora(opts, work, template):
        stream = isolated(startup, env, directory, validation, tokenizer, out, True, opts.timeout)
        row = [f"{megabytes} MB", fmt(stream["first_step_s"], opts.timeout), f"{stream['peak_rss_mib']:.0f}"]
        if megabytes <= opts.map_style_cap_mb:
            single = os.path.join(work, f"single-{megabytes}.txt")
            with open(single, "wb") as handle:
                for shard in sorted(os.listdir(directory)):
                    with open(os.path.join(directory, shard), "rb") as part:
                        shutil.copyfileobj(part, handle)
            mapped = isolated(startup, env, single, validation, tokenizer, out, False, opts.timeout)
            row += [fmt(mapped["first_step_s"], opts.timeout), f"{mapped['peak_rss_mib']:.0f}"]
            os.remove(single)
        else:
            row += ["not run (capped)", "-"]
        print("| " + " | ".join(row) + " |", flush=True)


def trainer_startup_table(opts, work, template, validation, tokenizer, out, env) -> None:
    """Our --streaming start-up against the Trainer's `run_mlm.py --streaming`, on the same shards."""
    print("| corpus | ours --streaming: s to step 1 | peak RSS MiB | Trainer --streaming: s to step 1 | peak RSS MiB "
          "| Trainer / ours: s | RSS |")
    print("|---|---|---|---|---|---|---|")
    for megabytes, directory in corpora(opts, work, template):
        ours = isolated(startup, env, directory, validation, tokenizer, out, True, opts.timeout)
        theirs = isolated(trainer_startup, env, directory, tokenizer, os.path.join(work, "trainer-out"), opts.timeout)
        row = [f"{megabytes} MB", fmt(ours["first_step_s"], opts.timeout), f"{ours['peak_rss_mib']:.0f}",
               fmt(theirs["first_step_s"], opts.timeout), f"{theirs['peak_rss_mib']:.0f}",
               ratio(theirs["first_step_s"], ours["first_step_s"]),
               ratio(theirs["peak_rss_mib"], ours["peak_rss_mib"])]
        print("| " + " | ".join(row) + " |", flush=True)


def our_checkpoint(work, largest, validation, tokenizer, env) -> str:
    """An output directory holding our --streaming job's checkpoint-10 of the largest corpus."""
    resume_dir = os.path.join(work, "resume")
    if not os.path.isdir(resume_dir):
        subprocess.run([*JOBS["ours"][0], *job_argv(largest, validation, tokenizer, resume_dir, 10, "--streaming",
                                                     "--save_steps", "10")], env=env, cwd=REPO, check=True,
                       capture_output=True)
    return resume_dir


def resume_table(opts, work, largest, validation, tokenizer, env) -> None:
    resume_dir = our_checkpoint(work, largest, validation, tokenizer, env)
    corpus_bytes = sum(os.path.getsize(os.path.join(largest, name)) for name in os.listdir(largest))
    deep_dir = deeper_copy(resume_dir, 1_000_000, lambda checkpoint, step: deepen(checkpoint, corpus_bytes, step))
    fresh = timed_run("ours", job_argv(largest, validation, tokenizer, os.path.join(work, "fresh"), 12, "--streaming"),
                      env, opts.timeout)["first_step_s"]
    near = our_resume_latency(largest, validation, tokenizer, resume_dir, env, 10, opts.timeout)
    deep = our_resume_latency(largest, validation, tokenizer, deep_dir, env, 1_000_000, opts.timeout)
    print(f"\nresume, s to the first step after it: from step 10 {fmt(near, opts.timeout)}; from step 1,000,000 "
          f"(lanes 90% into {corpus_bytes / 1e9:.2f} GB) {fmt(deep, opts.timeout)} ({ratio(deep, near)}); a fresh "
          f"start {fmt(fresh, opts.timeout)}")


def trainer_resume_table(opts, work, largest, validation, tokenizer, env) -> None:
    """Resume latency at each --resume_steps, ours (a seek: checkpoint-10 deepened, as in resume_table) against the
    Trainer's (a replay of every consumed batch through the stream), with a fresh start of each for reference."""
    ours_dir = our_checkpoint(work, largest, validation, tokenizer, env)
    corpus_bytes = sum(os.path.getsize(os.path.join(largest, name)) for name in os.listdir(largest))
    theirs_dir = os.path.join(work, "trainer-resume")
    subprocess.run([*JOBS["trainer"][0], *trainer_argv(largest, tokenizer, theirs_dir, 10, "--save_steps", "10")],
                   env=env, cwd=REPO, check=True, capture_output=True)
    ours_fresh = timed_run("ours", job_argv(largest, validation, tokenizer, os.path.join(work, "fresh"), 2,
                                            "--streaming", "--overwrite_output_dir"), env, opts.timeout)
    theirs_fresh = timed_run("trainer", trainer_argv(largest, tokenizer, os.path.join(work, "trainer-fresh"), 2), env,
                             opts.timeout)
    print("\n| resume from step | ours: s to the next step | Trainer: s to the next step | Trainer / ours |")
    print("|---|---|---|---|")
    print(f"| none (a fresh start) | {fmt(ours_fresh['first_step_s'], opts.timeout)} | "
          f"{fmt(theirs_fresh['first_step_s'], opts.timeout)} | "
          f"{ratio(theirs_fresh['first_step_s'], ours_fresh['first_step_s'])} |", flush=True)
    for step in opts.resume_steps:
        ours_at = ours_dir if step == 10 else deeper_copy(
            ours_dir, step, lambda checkpoint, deep: deepen(checkpoint, corpus_bytes, deep))
        theirs_at = theirs_dir if step == 10 else deeper_copy(theirs_dir, step, set_global_step)
        ours = our_resume_latency(largest, validation, tokenizer, ours_at, env, step, opts.resume_timeout)
        theirs = resume_latency("trainer", trainer_argv(largest, tokenizer, theirs_at, step + 2), env,
                                opts.resume_timeout, step)
        print(f"| {step:,} | {fmt(ours, opts.resume_timeout)} | {fmt(theirs, opts.resume_timeout)} | "
              f"{ratio(theirs, ours)} |", flush=True)


def our_resume_latency(train, validation, tokenizer, output_dir, env, step, timeout):
    return resume_latency("ours", job_argv(train, validation, tokenizer, output_dir, step + 2, "--streaming"), env,
                          timeout, step)


def resume_latency(job: str, argv: list[str], env: dict, timeout: float, step: int) -> float | None:
    """Seconds from the process start to the first optimizer step after a resume from `step` (None: not reached
    within `timeout`). A first step other than `step` + 1 means the run did not resume there: an error."""
    started = time.perf_counter()
    process, watchdog = start(job, argv, env, timeout)
    try:
        for line in process.stdout:
            logged = JOBS[job][1].search(line)
            if logged:
                if int(logged.group(1)) != step + 1:
                    raise RuntimeError(f"{job}: step {logged.group(1)} after a resume from step {step}: {argv}")
                return time.perf_counter() - started
        return None
    finally:
        watchdog.cancel()
        process.kill()
        process.wait()


def fmt(seconds, timeout) -> str:
    return f"{seconds:.1f}" if seconds is not None else f"> {timeout:.0f} (timed out)"


def ratio(numerator, denominator) -> str:
    """numerator / denominator as "N.NNx", or "-" when either was not measured (a run past its cap)."""
    return f"{numerator / denominator:.2f}x" if numerator is not None and denominator is not None else "-"


if __name__ == "__main__":
    main()
