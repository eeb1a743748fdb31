"""Shared fixtures: a small generated corpus, a tokenizer trained on it, and a way to run jobs for real.

Everything is local; nothing is downloaded. Jobs run as real processes (`python -m` or `torchrun`), because
that is how users run them and the only way to test exit codes, distributed start-up and what lands on disk.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# A tiny BERT without dropout: runs in seconds, and is deterministic across world sizes.
TINY_BERT = ["--model_type", "bert", "--config_overrides",
             "hidden_size=32,num_hidden_layers=2,num_attention_heads=2,intermediate_size=64,"
             "hidden_dropout_prob=0,attention_probs_dropout_prob=0,max_position_embeddings=128"]


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> dict:
    """The embedded movie-review corpus, cut small: {'train': path, 'validation': path}."""
    from trainer.data.demo import write_mlm_corpus

    directory = tmp_path_factory.mktemp("corpus")
    return cut_splits(write_mlm_corpus(str(directory / "full")), directory, ".txt", 1500, 120)


def cut_splits(splits: tuple[str, str], directory, extension: str, train_lines: int,
               validation_lines: int) -> dict:
    """{'train': path, 'validation': path}: the first lines of each of the (train, validation) files `splits`."""
    train, validation = splits
    return {"train": write_head(train, directory / f"train{extension}", train_lines),
            "validation": write_head(validation, directory / f"validation{extension}", validation_lines)}


def write_head(source: str, destination, lines: int) -> str:
    """The first `lines` lines of `source`, written to `destination`."""
    with open(source) as handle:
        head = [next(handle) for _ in range(lines)]
    with open(destination, "w") as handle:
        handle.writelines(head)
    return str(destination)


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory, corpus) -> str:
    from trainer.data.demo import train_wordpiece_tokenizer

    directory = str(tmp_path_factory.mktemp("tokenizer"))
    train_wordpiece_tokenizer([corpus["train"]], vocab_size=1000, output_dir=directory)
    return directory


@pytest.fixture(scope="session")
def job_env(tmp_path_factory) -> dict:
    """Environment for job subprocesses: private caches, the repo importable, no network attempts."""
    cache = tmp_path_factory.mktemp("cache")
    env = dict(os.environ)
    env.update(TRAINER_CACHE=str(cache / "trainer"), HF_DATASETS_CACHE=str(cache / "datasets"),
               HF_HOME=str(cache / "hf"), HF_HUB_OFFLINE="1", PYTHONPATH=REPO_ROOT, OMP_NUM_THREADS="1",
               TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    return env


@pytest.fixture(scope="session")
def two_process_resume_run(corpus, tokenizer_dir, job_env, tmp_path_factory):
    """resume_helpers' job, uninterrupted, on 2 processes under torchrun (DDP): (output dir, sample log). The
    reference of the two-process resume tests and the DDP side of every ZeRO and FSDP2 comparison."""
    from resume_helpers import uninterrupted_run

    return uninterrupted_run(corpus, tokenizer_dir, job_env, tmp_path_factory.mktemp("resume-ddp"), 2)


# What a launcher tells its processes; an in-process DeepSpeed job sets them for itself when they are missing
# (trainer.distributed.launch.default_single_process_environment), as a plain `python -m` run needs.
LAUNCHER_VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture(autouse=True)
def as_a_fresh_process():
    """After each test, this process is again as a fresh `python -m` finds itself: without the launcher variables
    an in-process job set, and without accelerate's shared state. Left behind, they make the next in-process job a
    one-process "distributed" CPU run (accelerate's MULTI_CPU), whose process group the previous job tore down."""
    saved = {key: os.environ.get(key) for key in LAUNCHER_VARIABLES}
    yield
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    if "accelerate.state" in sys.modules:
        from accelerate.state import AcceleratorState, GradientState

        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()


@pytest.fixture
def in_process_job(job_env, monkeypatch):
    """Run a job's `main` in this process (no interpreter start-up) with the test caches and extra variables."""
    for key in ("TRAINER_CACHE", "HF_DATASETS_CACHE", "HF_HUB_OFFLINE"):
        monkeypatch.setenv(key, job_env[key])

    def run(main, argv, **variables):
        for key in ("TRAINER_FAULT_SIGNAL_AT_MICRO_BATCH", "TRAINER_DEBUG_SAMPLE_LOG"):
            monkeypatch.delenv(key, raising=False)
        for key, value in variables.items():
            monkeypatch.setenv(key, str(value))
        try:
            return main(argv)
        except SystemExit as stop:  # a stop signal: checkpoint saved, exit code 0
            assert stop.code == 0
            return None

    return run


def run_job(module: str, args: list[str], env: dict, nproc: int = 1, check: bool = True,
            timeout: float = 600, launcher: list[str] | None = None) -> subprocess.CompletedProcess:
    """Run `python -m module args` (or torchrun with `nproc` processes on gloo, or under `launcher`, a command
    prefix such as `accelerate_launch(yaml)` or `deepspeed_launch()`) and return the result."""
    if launcher is None:
        launcher = [sys.executable] if nproc == 1 else [
            sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
            str(free_port())]
    # The deepspeed launcher names a module with `--module NAME`, the others with `-m NAME`.
    command = [*launcher, *([] if launcher[-1] == "--module" else ["-m"]), module, *args]
    result = subprocess.run(command, env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(command)} exited {result.returncode}\n--- stdout\n{result.stdout[-6000:]}"
                             f"\n--- stderr\n{result.stderr[-6000:]}")
    return result


def accelerate_launch(yaml: str) -> list[str]:
    """`accelerate launch` with one of the shipped YAMLs (launch/accelerate/), as a launcher for `run_job`."""
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
            os.path.join(REPO_ROOT, "launch", "accelerate", yaml), "--main_process_port", str(free_port())]


def deepspeed_launch(nproc: int = 2) -> list[str]:
    """DeepSpeed's own launcher (`deepspeed --num_gpus N --module ...`; on the CPU too), for `run_job`."""
    return [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(nproc), "--master_port",
            str(free_port()), "--module"]


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def read_results(output_dir) -> dict:
    with open(os.path.join(output_dir, "all_results.json")) as handle:
        return json.load(handle)


def read_history(output_dir) -> list[dict]:
    with open(os.path.join(output_dir, "log_history.jsonl")) as handle:
        return [json.loads(line) for line in handle]


def load_parameters(output_dir) -> dict:
    from safetensors.torch import load_file

    return load_file(os.path.join(output_dir, "model.safetensors"))


def mlm_args(corpus, tokenizer_dir, output_dir, *extra) -> list[str]:
    """A small, fast trainer.mlm command line on the test corpus."""
    return ["--train_file", corpus["train"], "--validation_file", corpus["validation"],
            "--tokenizer_name", tokenizer_dir, *TINY_BERT, "--max_seq_length", "32",
            "--output_dir", str(output_dir), "--learning_rate", "5e-3", "--logging_steps", "1",
            "--report_to", "none", "--probe_sentences", "", *extra]


def changed_tensors(before_dir, after_dir, prefix: str) -> set[str]:
    """Names of `before_dir`'s saved tensors under `prefix` (e.g. the base model's) that differ bitwise in
    `after_dir`: what a fine-tuning strategy actually trained."""
    import torch

    before, after = load_parameters(before_dir), load_parameters(after_dir)
    shared = [name for name in before if name.startswith(prefix)]
    assert shared and all(name in after for name in shared)
    return {name for name in shared if not torch.equal(before[name], after[name])}


def saved_tensor_names(directory, prefix: str) -> set[str]:
    return {name for name in load_parameters(directory) if name.startswith(prefix)}


def fails_cleanly(main, argv, capsys) -> str:
    """Run a job's `main(argv)` in-process, expect bad input's standard (exit code 2, no traceback, one final
    `error: ...` line on stderr) and return that line."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    # Progress bars of work done before the problem showed up may precede it; the error is one final line.
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and err.rstrip().endswith(errors[0]), err
    return errors[0]


def write_yaml_config(args: list[str], path, drop: tuple[str, ...] = ()) -> str:
    """A command line (`--flag value ...`, bare flags as true) written as the YAML config a job also accepts."""
    import yaml

    config = {}
    for index, token in enumerate(args):
        if token.startswith("--") and token[2:] not in drop:
            value = args[index + 1] if index + 1 < len(args) and not args[index + 1].startswith("--") else True
            config[token[2:]] = yaml.safe_load(value) if isinstance(value, str) else value
    path.write_text(yaml.safe_dump(config))
    return str(path)


def relative_difference(reference: dict, other: dict) -> float:
    """Norm of the parameter difference over the norm of the reference parameters, over all of `reference`."""
    num = sum(float((reference[k].double() - other[k].double()).norm() ** 2) for k in reference) ** 0.5
    den = sum(float(reference[k].double().norm() ** 2) for k in reference) ** 0.5
    return num / den


def assert_export_reproduces_eval_perplexity(exported, corpus, tokenizer_dir, job_env, tmp_path, *eval_args) -> None:
    """A new job starting from the exported directory measures the same perplexity before its first step
    (`eval_args`: what the exporting job's evaluation set differs by from `mlm_args`, e.g. --max_eval_samples)."""
    assert not os.path.exists(exported / "pytorch_model.bin") and os.path.isfile(exported / "model.safetensors")
    out = tmp_path / "reload"
    args = mlm_args(corpus, tokenizer_dir, out, "--max_steps", "1", "--per_device_train_batch_size", "4",
                    "--per_device_eval_batch_size", "16", *eval_args)
    args = [a for a in args if a not in TINY_BERT]  # the model comes from the export instead
    run_job("trainer.mlm", [*args, "--model_name_or_path", str(exported)], job_env)
    assert read_results(out)["init_eval_perplexity"] == pytest.approx(read_results(exported)["eval_perplexity"],
                                                                      rel=1e-6)


class mounted_tmpfs:
    """`mount -t tmpfs -o OPTIONS` on a fresh directory for the `with` block (root only); skips the test where
    mounting is not allowed (a container without CAP_SYS_ADMIN, a normal user)."""

    def __init__(self, directory, options: str):
        self.directory, self.options = str(directory), options

    def __enter__(self) -> str:
        os.makedirs(self.directory, exist_ok=True)
        result = subprocess.run(["mount", "-t", "tmpfs", "-o", self.options, "tmpfs", self.directory],
                                capture_output=True, text=True)
        if result.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here ({result.stderr.strip() or 'mount failed'}); needs root with "
                        f"CAP_SYS_ADMIN, as in CI")
        return self.directory

    def __exit__(self, *exc) -> None:
        subprocess.run(["umount", "-l", self.directory], check=True)
