"""The sbatch scripts in slurm/, run on a real single-node Slurm cluster that tests/slurm/cluster.sh brings up.

CPU variant (TRAINER_DEVICE=cpu: gloo, no GPU requested), 2 processes per node on the cluster's 2 CPUs, one job at
a time. All trainer.mlm runs share one configuration, so every run with 2 processes must end with the same
parameters: the single-node job is the reference for the pre-empted multi-node job and for two torchrun agents
meeting through the scripts' rendezvous code outside Slurm. The DeepSpeed script runs trainer.clm (`--job clm`):
the scripts take the job as a parameter.
"""
from __future__ import annotations

import os
import re
import socket
import subprocess
import time

import pytest

from classify_helpers import sentiment  # noqa: F401 (a fixture)
from clm_helpers import bpe_tokenizer_dir, clm_args  # noqa: F401 (a fixture)
from conftest import REPO_ROOT, TINY_BERT, mlm_args, read_results
from resume_helpers import assert_same_parameters, wait_for_path

pytestmark = pytest.mark.slow

CLUSTER_SCRIPT = os.path.join(REPO_ROOT, "tests", "slurm", "cluster.sh")
SCRIPTS = {name: os.path.join(REPO_ROOT, "slurm", f"{name}.sbatch")
           for name in ("single_node", "multi_node", "deepspeed", "classify",
                        "mlm_single_node", "mlm_multi_node", "mlm_deepspeed")}  # the last three: the old names
STEPS, SAVE_STEPS = 20, 10


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    """A fresh cluster for this session; fails (never skips) when it cannot start, and is stopped at the end."""
    state_dir = tmp_path_factory.mktemp("slurm-cluster")
    started = subprocess.run([CLUSTER_SCRIPT, "start", str(state_dir)], capture_output=True, text=True, timeout=600)
    if started.returncode != 0:
        pytest.fail(f"could not start the test Slurm cluster (exit {started.returncode}):\n{started.stderr[-4000:]}")
    match = re.fullmatch(r"export SLURM_CONF=(\S+)\s*", started.stdout)
    assert match, f"unexpected output of cluster.sh start: {started.stdout!r}"
    yield {"SLURM_CONF": match.group(1), "state_dir": str(state_dir)}
    subprocess.run([CLUSTER_SCRIPT, "stop", str(state_dir)], capture_output=True, timeout=120)


@pytest.fixture(scope="session")
def slurm_env(job_env, slurm_cluster) -> dict:
    return {**job_env, "SLURM_CONF": slurm_cluster["SLURM_CONF"], "TRAINER_DEVICE": "cpu",
            "TRAINER_NPROC_PER_NODE": "2"}


def training_args(corpus, tokenizer_dir, output_dir, *extra) -> list[str]:
    return mlm_args(corpus, tokenizer_dir, output_dir, "--max_steps", str(STEPS), "--save_steps", str(SAVE_STEPS),
                    "--per_device_train_batch_size", "4", "--logging_steps", "5", *extra)


def sbatch_command(script: str, args: list[str], log=None, *options: str) -> list[str]:
    """`sbatch --wait`: its exit code is the job's (of the last run, after requeues). Without `log` the job logs
    where the script says: %x-%j.out in the working directory."""
    log_option = [f"--output={log}"] if log else []
    return ["sbatch", "--wait", "--parsable", "--nodes=1", "--cpus-per-task=2", *log_option, *options,
            SCRIPTS[script], *args]


def run_sbatch(script: str, args: list[str], env: dict, workdir, *options: str) -> str:
    """Submit, wait for the job to end, assert it succeeded; returns the job log."""
    log = workdir / f"{script}.log"
    result = subprocess.run(sbatch_command(script, args, log, *options), env=env, cwd=workdir, capture_output=True,
                            text=True, timeout=600)
    text = log.read_text() if log.exists() else "(no job log)"
    assert result.returncode == 0, f"sbatch exited {result.returncode}: {result.stderr}\n--- job log\n{text[-6000:]}"
    return text


def assert_loadable_model(output_dir, job: str = "mlm") -> None:
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM

    model = (AutoModelForMaskedLM if job == "mlm" else AutoModelForCausalLM).from_pretrained(str(output_dir))
    assert model.config.hidden_size == 32
    results = read_results(output_dir)
    assert results["eval_perplexity"] < results["init_eval_perplexity"]


@pytest.fixture(scope="module")
def single_node_run(corpus, tokenizer_dir, slurm_env, tmp_path_factory):
    """The reference: an uninterrupted single-node job with 2 processes."""
    workdir = tmp_path_factory.mktemp("single-node")
    output_dir = workdir / "out"
    log = run_sbatch("single_node", training_args(corpus, tokenizer_dir, output_dir), slurm_env, workdir)
    return output_dir, log


def test_single_node_script_trains_with_torchrun_and_leaves_a_loadable_model(single_node_run):
    output_dir, log = single_node_run
    assert "--nproc_per_node=2" in log and "--standalone" in log
    assert read_results(output_dir)["train_steps"] == STEPS
    assert_loadable_model(output_dir)


def test_multi_node_script_is_preempted_requeued_and_resumes_to_the_uninterrupted_parameters(
        single_node_run, corpus, tokenizer_dir, slurm_env, slurm_cluster, tmp_path):
    output_dir = tmp_path / "out"
    # Each save pauses 2 s, so the job is certainly still training when the signal arrives during the first one.
    env = {**slurm_env, "TRAINER_FAULT_SLEEP_IN_SAVE": "2"}
    command = sbatch_command("multi_node", training_args(corpus, tokenizer_dir, output_dir))
    job = subprocess.Popen(command, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    job_id = job.stdout.readline().strip()
    wait_for_path(output_dir / f"checkpoint-{SAVE_STEPS}.tmp", job)
    subprocess.run(["scancel", "--signal=USR2", "--batch", job_id], env=env, check=True, timeout=60)
    _, stderr = job.communicate(timeout=600)
    text = (tmp_path / f"trainer-multi-node-{job_id}.out").read_text()  # both runs append to the script's log
    assert job.returncode == 0, f"sbatch exited {job.returncode}: {stderr}\n--- job log\n{text[-6000:]}"

    # Slurm -> batch shell -> srun -> torchrun -> both workers: all stop and save the same step, then requeue.
    stopped = re.findall(r"stop signal received: saved checkpoint-(\d+)", text)
    assert len(stopped) == 2 and stopped[0] == stopped[1], text[-6000:]
    assert SAVE_STEPS <= int(stopped[0]) < STEPS
    assert f"requeueing job {job_id} (restart 1)" in text
    assert f"job {job_id} restart 1 on" in text
    assert f"resumed from {output_dir / ('checkpoint-' + stopped[0])}: step {stopped[0]}" in text
    job_states = re.findall(rf"JobId={job_id} .*?JobState=(\w+)", open(
        os.path.join(slurm_cluster["state_dir"], "log", "jobcomp.log")).read())
    assert job_states == ["PENDING", "COMPLETED"]  # requeued once, then finished

    # The rendezvous path: c10d on the first node, port from the job id.
    port = 15000 + int(job_id) % 10000
    assert re.search(rf"--rdzv_backend=c10d --rdzv_id={job_id} --rdzv_endpoint=\S+:{port} ", text), text[:3000]
    assert read_results(output_dir)["train_steps"] == STEPS
    assert_loadable_model(output_dir)
    assert_same_parameters(output_dir, single_node_run[0])


def free_rendezvous_job_id() -> int:
    """A job id whose derived rendezvous port (15000 + id % 10000) is free here."""
    for job_id in range(int(time.time()) % 10000, 10000):
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", 15000 + job_id))
                return job_id
            except OSError:
                continue
    raise AssertionError("no free port in 15000-24999")


def test_rendezvous_of_the_scripts_joins_two_torchrun_agents_on_localhost(
        single_node_run, corpus, tokenizer_dir, job_env, tmp_path):
    """Outside Slurm: two 'nodes' (torchrun agents, 1 process each) meet through common.sh's c10d options."""
    output_dir = tmp_path / "out"
    node = ('source slurm/common.sh && trainer_setup_environment && trainer_torchrun_options multi && '
            'exec python3 -m torch.distributed.run "${TRAINER_TORCHRUN[@]}" -m trainer.mlm "$@"')
    env = {**job_env, "SLURM_JOB_ID": str(free_rendezvous_job_id()), "SLURM_JOB_NUM_NODES": "2",
           "TRAINER_RDZV_HOST": "127.0.0.1", "TRAINER_DEVICE": "cpu", "TRAINER_NPROC_PER_NODE": "1"}
    agents = [subprocess.Popen(["bash", "-c", node, SCRIPTS["multi_node"],
                                *training_args(corpus, tokenizer_dir, output_dir)],
                               env=env, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
              for _ in range(2)]
    outputs = [agent.communicate(timeout=600)[0] for agent in agents]
    for agent, output in zip(agents, outputs):
        assert agent.returncode == 0, output[-6000:]
    assert "(4 per device x 2 processes x 1 accumulation)" in "".join(outputs)
    assert read_results(output_dir)["train_steps"] == STEPS
    assert_same_parameters(output_dir, single_node_run[0])  # 2 agents x 1 process == 1 node x 2 processes


def test_deepspeed_script_trains_clm_with_zero2_and_leaves_a_loadable_model(corpus, bpe_tokenizer_dir, slurm_env,
                                                                             tmp_path):
    output_dir = tmp_path / "out"
    args = clm_args(corpus, bpe_tokenizer_dir, output_dir, "--max_steps", "4", "--per_device_train_batch_size", "4")
    log = run_sbatch("deepspeed", ["--job", "clm", *args], slurm_env, tmp_path)
    assert re.search(r"--rdzv_backend=c10d .* -m trainer.clm --deepspeed \S+/ds_configs/zero2.json ", log), log[:3000]
    assert "deepspeed_shm_comm_op" in log  # DeepSpeed's own communication ran
    assert read_results(output_dir)["train_steps"] == 4
    assert_loadable_model(output_dir, "clm")


# ---------------------------------------------------------------------------------------------- bad input
BAD_INPUT = {
    "no arguments": ([], {}, "no arguments given"),
    "no output_dir": (["--train_file", "train.txt"], {}, "give --output_dir"),
    "no training data": (["--output_dir", "out"], {}, "give the training data"),
    "GPU wanted, none allocated": (["--train_file", "train.txt", "--output_dir", "out"], {"TRAINER_DEVICE": "gpu"},
                                   "no GPUs allocated"),
    "unknown job": (["--job", "gpt", "--train_file", "train.txt", "--output_dir", "out"], {},
                    "unknown job 'gpt': choose one of mlm clm classify"),
    "unknown job from the environment": (["--train_file", "train.txt", "--output_dir", "out"],
                                         {"TRAINER_JOB": "trainer.gpt"}, "unknown job 'trainer.gpt'"),
}


@pytest.mark.parametrize("script", sorted(SCRIPTS))
@pytest.mark.parametrize("case", sorted(BAD_INPUT))
def test_bad_input_prints_usage_and_exits_2_before_starting_anything(script, case, job_env, tmp_path):
    args, variables, message = BAD_INPUT[case]
    # A python that leaves a trace if anything at all tries to start it.
    trace, fake_python = tmp_path / "python-started", tmp_path / "python3"
    fake_python.write_text(f"#!/bin/sh\ntouch {trace}\n")
    fake_python.chmod(0o755)
    env = {**job_env, "TRAINER_DEVICE": "cpu", "TRAINER_PYTHON": str(fake_python), **variables}
    env.pop("SLURM_JOB_ID", None)
    result = subprocess.run(["bash", SCRIPTS[script], *args], env=env, cwd=tmp_path, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 2
    assert result.stderr.startswith(f"error: {message}")
    assert "sbatch" in result.stderr and "--output_dir" in result.stderr  # the usage follows the error
    assert not trace.exists() and not (tmp_path / "out").exists()


def test_bad_input_fails_the_submitted_job_with_the_usage_in_its_log(slurm_env, tmp_path):
    log = tmp_path / "bad.log"
    # Submitted under its old name (a link to single_node.sbatch): existing commands keep working.
    result = subprocess.run(sbatch_command("mlm_single_node", ["--train_file", "train.txt"], log), env=slurm_env,
                            cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    text = log.read_text()
    assert "error: give --output_dir" in text and "Every argument after the script goes to" in text
    assert "torch.distributed.run" not in text


def test_classify_script_fine_tunes_and_leaves_a_loadable_classifier(sentiment, tokenizer_dir, slurm_env, tmp_path):
    from transformers import AutoModelForSequenceClassification

    output_dir = tmp_path / "out"
    args = ["--train_file", sentiment["train"], "--validation_file", sentiment["validation"], "--text_column",
            "sentence", "--tokenizer_name", tokenizer_dir, *TINY_BERT, "--max_seq_length", "64", "--output_dir",
            str(output_dir), "--max_steps", "10", "--per_device_train_batch_size", "4", "--learning_rate", "1e-3",
            "--report_to", "none"]
    log = run_sbatch("classify", args, slurm_env, tmp_path)
    assert "trainer.classify" in log and "--nproc_per_node=2" in log
    model = AutoModelForSequenceClassification.from_pretrained(str(output_dir))
    assert model.config.id2label == {0: "negative", 1: "positive"}
    results = read_results(output_dir)
    assert results["train_steps"] == 10 and 0 <= results["eval_accuracy"] <= 1
