"""--report_to with the real tracker libraries, offline: W&B in offline mode, MLflow on a local sqlite store,
trackio in a local directory. Each test reads the curves back from the tracker's own store."""
from __future__ import annotations

import glob
import json
import os
import struct
import subprocess
import sys

import pytest

from conftest import fails_cleanly, mlm_args, read_history, read_results, run_job
from resume_helpers import resume_args, with_env
from trainer.errors import UsageError
from trainer.mlm import main
from trainer.tracking import tracker_names

SECRET = "hf_tracking_test_secret_0123456789"


def test_report_to_takes_a_comma_list_all_and_none():
    assert tracker_names("tensorboard,mlflow, wandb") == ["tensorboard", "mlflow", "wandb"]
    assert tracker_names("none") == []
    assert tracker_names("all") == ["tensorboard", "wandb", "mlflow", "trackio"]  # all installed in the test env
    for bad in ("tensorbord", "none,wandb", ","):
        with pytest.raises(UsageError):
            tracker_names(bad)


def test_bad_or_unreachable_trackers_are_one_line_errors_before_any_work(corpus, tokenizer_dir, tmp_path, capsys,
                                                                       monkeypatch):
    out = tmp_path / "out"

    def error(report_to: str) -> str:
        return fails_cleanly(main, mlm_args(corpus, tokenizer_dir, out, "--max_steps", "2", "--report_to",
                                            report_to), capsys)

    assert error("tensorboard,tensorbord") == ("error: --report_to tensorboard,tensorbord: unknown tensorbord; "
                                               "choose from tensorboard, wandb, mlflow, trackio, all, none "
                                               "(comma-separated)")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")
    assert "MLflow tracking server http://127.0.0.1:9 is unreachable" in error("tensorboard,mlflow")
    for name in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_IDENTITY_TOKEN_FILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    assert "no W&B API key" in error("wandb")
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")
    assert "W&B server http://127.0.0.1:9 is unreachable" in error("wandb")
    assert not out.exists()  # nothing written


def test_a_tracker_failing_mid_run_is_one_warning_and_training_goes_on(corpus, tokenizer_dir, tmp_path, capsys,
                                                                      monkeypatch):
    from trainer.tracking.tensorboard import TensorBoardTracker

    calls = []

    def broken_log(self, step, metrics):
        calls.append(step)
        if len(calls) == 2:
            raise RuntimeError("disk of the tracker's server is full\nsecond line")
        TensorBoardTracker.log.__wrapped__(self, step, metrics)

    broken_log.__wrapped__ = TensorBoardTracker.log
    monkeypatch.setattr(TensorBoardTracker, "log", broken_log)
    out = tmp_path / "out"
    main(mlm_args(corpus, tokenizer_dir, out, "--max_steps", "4", "--report_to", "tensorboard"))
    warnings = [line.split(" WARNING ", 1)[1] for line in capsys.readouterr().out.splitlines()
                if "--report_to tensorboard failed" in line]
    assert warnings == ["--report_to tensorboard failed in log (RuntimeError: disk of the tracker's server is "
                        "full); it is disabled and training goes on"]
    assert len(calls) == 2  # never called again
    assert read_results(out)["train_steps"] == 4
    assert [r["step"] for r in read_history(out) if "train_loss" in r] == [1, 2, 3, 4]


# ------------------------------------------------------------------------------- every tracker, pre-empted
@pytest.fixture(scope="module")
def tracked_resumed_run(corpus, tokenizer_dir, job_env, tmp_path_factory):
    """resume_helpers' job with every tracker, stopped by a signal in step 6 (checkpoints 4 and 6), then resumed
    from checkpoint-4, so that step 6 is logged again by the resumed run: (output dir, env, the two logs)."""
    root = tmp_path_factory.mktemp("tracked")
    env = with_env(job_env, WANDB_MODE="offline", WANDB_DIR=root / "wandb", WANDB_SILENT="true",
                   MLFLOW_TRACKING_URI=f"sqlite:///{root / 'mlflow.db'}", TRACKIO_DIR=root / "trackio",
                   TRACKIO_PROJECT="tracked", WANDB_PROJECT="tracked")
    out = root / "run"
    args = [*resume_args(corpus, tokenizer_dir, out), "--report_to", "tensorboard,wandb,mlflow,trackio",
            "--hub_token", SECRET, "--run_name", "resumed-run"]
    first = run_job("trainer.mlm", args, with_env(env, TRAINER_FAULT_SIGNAL_AT_MICRO_BATCH=11), check=False)
    assert first.returncode == 0 and "saved checkpoint-6" in first.stdout + first.stderr, first.stdout[-3000:]
    assert mlflow_runs(env)[0].info.status == "KILLED"  # until it is resumed
    second = run_job("trainer.mlm", [*args, "--resume_from_checkpoint", str(out / "checkpoint-4")], env)
    return out, env, root, first.stdout + first.stderr + second.stdout + second.stderr


def train_losses(out) -> list[tuple[int, float]]:
    return [(r["step"], r["train_loss"]) for r in read_history(out) if "train_loss" in r]


def mlflow_runs(env) -> list:
    from mlflow import MlflowClient

    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    return client.search_runs([client.get_experiment_by_name("Default").experiment_id])


def test_mlflow_keeps_one_run_with_every_step_once(tracked_resumed_run):
    from mlflow import MlflowClient

    out, env, root, _ = tracked_resumed_run
    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    runs = mlflow_runs(env)
    assert len(runs) == 1 and runs[0].info.run_name == "resumed-run" and runs[0].info.status == "FINISHED"
    history = client.get_metric_history(runs[0].info.run_id, "train/loss")
    assert [(m.step, m.value) for m in history] == train_losses(out)
    assert [step for step, _ in train_losses(out)] == [3, 6, 9, 12]
    evals = client.get_metric_history(runs[0].info.run_id, "eval/loss")
    assert sorted(m.step for m in evals) == [0, 12]
    assert runs[0].data.params["hub_token"] == "<redacted>" and runs[0].data.params["learning_rate"] == "0.005"


def test_wandb_offline_run_continues_with_the_same_id(tracked_resumed_run):
    out, env, root, _ = tracked_resumed_run
    run_dirs = sorted(glob.glob(str(root / "wandb" / "wandb" / "offline-run-*")))
    assert len(run_dirs) == 2  # the interrupted and the resumed part of one run
    ids = {os.path.basename(d).rsplit("-", 1)[1] for d in run_dirs}
    assert len(ids) == 1
    saved = json.load(open(out / "checkpoint-4" / "trainer_state.json"))["states"]["trackers"]["wandb"]
    assert saved == {"run_id": ids.pop()}
    logged = {}
    for directory in run_dirs:
        for record in wandb_history(glob.glob(os.path.join(directory, "*.wandb"))[0]):
            if "train/loss" in record:
                logged.setdefault(int(record["_step"]), []).append(float(record["train/loss"]))
    # W&B keeps what the interrupted run logged after checkpoint-4 (step 6); `wandb sync` merges the two parts.
    assert {step: values[-1] for step, values in logged.items()} == dict(train_losses(out))


def test_tensorboard_drops_the_events_after_the_checkpoint_resumed_from(tracked_resumed_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out, _, _, _ = tracked_resumed_run
    events = EventAccumulator(str(out / "runs"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("train/loss")] == [(s, pytest.approx(v, rel=1e-6))
                                                                          for s, v in train_losses(out)]


def test_trackio_run_resumed_in_place(tracked_resumed_run):
    out, env, root, _ = tracked_resumed_run
    # trackio reads TRACKIO_DIR when it is imported: read its store in a process of its own.
    read = "import json, trackio; print(json.dumps(trackio.SQLiteStorage.get_logs('tracked', 'resumed-run')))"
    logs = json.loads(subprocess.run([sys.executable, "-c", read], env=env, capture_output=True, text=True,
                                     check=True).stdout.splitlines()[-1])
    assert [(r["step"], r["train/loss"]) for r in logs if "train/loss" in r] == train_losses(out)


def test_no_secret_in_any_tracker_store_or_the_log(tracked_resumed_run):
    out, env, root, log = tracked_resumed_run
    assert SECRET not in log
    for path in glob.glob(str(root / "**"), recursive=True):
        if os.path.isfile(path):
            with open(path, "rb") as handle:
                assert SECRET.encode() not in handle.read(), path


def wandb_history(path: str) -> list[dict]:
    """The history records of an offline .wandb file: W&B's own protobuf records, in its LevelDB-style log
    (32 KiB blocks of chunks with a 7-byte header: CRC, length, type 1 full / 2 first / 3 middle / 4 last)."""
    from wandb.proto import wandb_internal_pb2

    with open(path, "rb") as handle:
        data = handle.read()
    assert data[:4] == b":W&B"
    position, pending, records = 7, b"", []
    while position + 7 <= len(data):
        left = 32768 - position % 32768
        _, length, kind = struct.unpack("<IHB", data[position:position + 7]) if left >= 7 else (0, 0, 0)
        if left < 7 or (length == 0 and kind == 0):
            position += left
            continue
        chunk, position = data[position + 7:position + 7 + length], position + 7 + length
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            if record.WhichOneof("record_type") == "history":
                records.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                                for item in record.history.item})
    return records
