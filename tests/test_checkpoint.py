"""Checkpoint bookkeeping: what counts as complete, rotation, the best model, divergence, bad options."""
import json
import logging
import os

import pytest

from conftest import load_parameters, read_results, run_job
from resume_helpers import assert_same_parameters, resume_args, with_env
from trainer.checkpoint.files import complete_checkpoints
from trainer.layout import COMPLETE_MARKER


def make_checkpoint(directory, step, marker=True, state='{"step": %d}'):
    path = directory / f"checkpoint-{step}"
    path.mkdir()
    (path / "trainer_state.json").write_text(state % step if "%d" in state else state)
    if marker:
        (path / COMPLETE_MARKER).write_text(f"{step}\n")
    return path


def test_incomplete_and_corrupt_checkpoints_are_skipped_with_a_warning_naming_them(tmp_path, caplog):
    good = make_checkpoint(tmp_path, 3)
    newest_good = make_checkpoint(tmp_path, 10)
    unmarked = make_checkpoint(tmp_path, 12, marker=False)
    corrupt = make_checkpoint(tmp_path, 14, state='{"ste')
    temporary = tmp_path / "checkpoint-16.tmp"
    temporary.mkdir()
    with caplog.at_level(logging.WARNING, logger="trainer"):
        assert complete_checkpoints(str(tmp_path)) == [(3, str(good)), (10, str(newest_good))]
    warnings = caplog.text
    assert f"skipping checkpoint {unmarked}: incomplete" in warnings
    assert f"skipping checkpoint {corrupt}: corrupt trainer_state.json" in warnings
    assert f"skipping checkpoint {temporary}: incomplete" in warnings


def test_rotation_keeps_the_newest_and_the_best_and_the_best_becomes_the_final_model(
        corpus, tokenizer_dir, job_env, tmp_path):
    out = tmp_path / "run"
    # "Best" = highest perplexity, i.e. the first checkpoint of a run whose perplexity falls: it must survive
    # the rotation and come back at the end, although two newer checkpoints exist.
    run_job("trainer.mlm", resume_args(corpus, tokenizer_dir, out, 1, "--save_total_limit", "1",
                                       "--load_best_model_at_end", "--greater_is_better", "true"), job_env)
    assert sorted(name for name in os.listdir(out) if name.startswith("checkpoint")) == ["checkpoint-12",
                                                                                           "checkpoint-4"]
    results = read_results(out)
    with open(out / "checkpoint-12" / "trainer_state.json") as handle:
        state = json.load(handle)
    best = state["states"]["best_model"]
    assert best["checkpoint"] == results["best_model_checkpoint"] == "checkpoint-4"
    assert best["value"] == results["best_metric"] > results["eval_perplexity"]
    # The job's main metric picks the best model, and the arguments kept are those given (nothing written back).
    assert best["metric"] == "eval_perplexity" and state["args"]["metric_for_best_model"] is None
    assert_same_parameters(out / "checkpoint-4", out)
    assert load_parameters(out).keys() == load_parameters(out / "checkpoint-12").keys()


def test_nan_loss_stops_the_run_with_a_message_and_keeps_the_last_good_checkpoint(
        corpus, tokenizer_dir, job_env, tmp_path):
    out = tmp_path / "run"
    # NaN in step 6, the last step of the window 4..6 (logged at step 6); checkpoint-4 is the last good one.
    result = run_job("trainer.mlm", resume_args(corpus, tokenizer_dir, out), with_env(job_env,
                     TRAINER_FAULT_NAN_AT_STEP=6), check=False)
    assert result.returncode == 3, result.stderr[-3000:]
    assert ("error: non-finite training loss or gradient between optimizer steps 4 and 6; stopping. The last good "
            f"checkpoint is checkpoint-4 in {out}") in result.stderr
    assert "Traceback" not in result.stderr
    assert sorted(name for name in os.listdir(out) if name.startswith("checkpoint")) == ["checkpoint-4"]
    assert not os.path.exists(out / "model.safetensors")


def test_bad_checkpoint_options_are_usage_errors(corpus, tokenizer_dir, job_env, tmp_path):
    out = tmp_path / "run"
    result = run_job("trainer.mlm", resume_args(corpus, tokenizer_dir, out, 1, "--stop_signals", "SIGKILL",
                                                "--resume_from_checkpoint", str(tmp_path / "missing")),
                     job_env, check=False)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("error: --stop_signals: SIGKILL is not a signal")
    assert not os.path.exists(out)


@pytest.mark.parametrize("size, steps, failed_save, kept", [
    ("1200k", "3", "checkpoint-2 failed", ["checkpoint-1", "log_history.jsonl"]),
    ("900k", "1", "the final model into {out} failed", None),
], ids=["second_checkpoint", "final_model"])
def test_disk_full_while_saving_keeps_the_last_good_checkpoint(size, steps, failed_save, kept, corpus, tokenizer_dir,
                                                               tmp_path, job_env, monkeypatch, capsys):
    """A checkpoint is ~770 KiB. On a 1200 KiB tmpfs the first one fits and the second cannot; on 900 KiB the
    only checkpoint fits and the final model after it cannot. The run stops with exit code 2 and one line naming
    checkpoint-1, no partial checkpoint is left, and checkpoint-1 is complete and loads."""
    from safetensors.torch import load_file

    from conftest import mlm_args, mounted_tmpfs
    from trainer.checkpoint.files import read_trainer_state
    from trainer.mlm import main

    for key in ("TRAINER_CACHE", "HF_DATASETS_CACHE", "HF_HUB_OFFLINE"):
        monkeypatch.setenv(key, job_env[key])
    with mounted_tmpfs(tmp_path / "small", f"size={size}") as disk:
        out = os.path.join(disk, "out")
        with pytest.raises(SystemExit) as stop:
            main(mlm_args(corpus, tokenizer_dir, out, "--max_steps", steps, "--save_steps", "1", "--peak_tflops", "1"))
        err = capsys.readouterr().err
        assert stop.value.code == 2 and "Traceback" not in err
        line = err.strip().splitlines()[-1]
        assert line.startswith(f"error: saving {failed_save.format(out=out)}: No space left on device"), line
        assert line.endswith(f"The last good checkpoint is checkpoint-1 in {out}; free disk space (or choose "
                             f"another --output_dir) and run the same command again to resume"), line
        if kept is not None:
            assert sorted(os.listdir(out)) == kept
        assert not any(name.endswith(".tmp") for name in os.listdir(out))
        assert complete_checkpoints(out) == [(1, os.path.join(out, "checkpoint-1"))]
        assert read_trainer_state(os.path.join(out, "checkpoint-1"))["step"] == 1
        assert load_file(os.path.join(out, "checkpoint-1", "model.safetensors"))  # whole and loadable


def test_the_checkpointer_restores_exactly_the_parts_it_is_given_without_an_engine(tokenizer_dir, tmp_path):
    """The checkpointer is given the model and its stateful parts by name, and callbacks (no engine): a save, then a
    resume into fresh parts, gives back the same weights, optimizer and scheduler state, train state, data position,
    logging window and a part it knows nothing about (a new stateful part is one more entry)."""
    import torch
    from accelerate import Accelerator
    from transformers import AutoTokenizer, BertConfig, BertForMaskedLM

    from trainer.checkpoint.arguments import CheckpointArguments
    from trainer.checkpoint.checkpointer import BestCheckpoint, Checkpointer, ModelFiles, RngStates
    from trainer.engine.loop import Window
    from trainer.engine.optim import OptimizationArguments, build_optimizer, build_scheduler
    from trainer.engine.state import TrainState

    checkpointing, optimization = CheckpointArguments(output_dir=str(tmp_path / "run")), OptimizationArguments()
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    accelerator, calls = Accelerator(cpu=True), []

    class Counter:  # any object with state_dict/load_state_dict
        def __init__(self):
            self.count = 0

        def state_dict(self):
            return {"count": self.count}

        def load_state_dict(self, saved):
            self.count = saved["count"]

    def parts(seed: int):
        torch.manual_seed(seed)
        model = BertForMaskedLM(BertConfig(vocab_size=len(tokenizer), hidden_size=16, num_hidden_layers=1,
                                           num_attention_heads=2, intermediate_size=32))
        optimizer = build_optimizer(model, optimization)
        scheduler = build_scheduler(optimizer, optimization, total_steps=10)
        state, counter, window = TrainState(), Counter(), Window(torch.device("cpu"))
        checkpointer = Checkpointer(
            checkpointing, accelerator, ModelFiles(model, model, tokenizer, optimizer),
            states={"train_state": state, "counter": counter},
            tensor_states={"optimizer.pt": optimizer, "scheduler.pt": scheduler},
            rank_states={"rng": RngStates(), "window": window}, best=BestCheckpoint(None), arguments={},
            inside_save=lambda: calls.append("inside_save"), on_saved=lambda path: calls.append(("saved", path)),
            on_resumed=lambda step: calls.append(("resumed", step)))
        return model, optimizer, scheduler, state, counter, window, checkpointer

    model, optimizer, scheduler, state, counter, window, checkpointer = parts(seed=0)
    model(input_ids=torch.tensor([[2, 5, 7, 3]]), labels=torch.tensor([[2, 5, 7, 3]])).loss.backward()
    optimizer.step()
    scheduler.step()
    state.step, state.tokens_seen, counter.count = 3, 96, 8
    state.loss_sum, state.loss_items, state.metrics = 2.5, 10, {"eval_loss": 1.25}
    window.loss_sum += 0.75
    window.items, window.tokens, window.first_step = 4, 32, 3
    path = checkpointer.save(state.step, state.metrics)
    assert calls == ["inside_save", ("saved", path)] and path.endswith("checkpoint-3")

    fresh_model, fresh_optimizer, fresh_scheduler, fresh_state, fresh_counter, fresh_window, fresh_checkpointer = \
        parts(seed=1)
    assert fresh_checkpointer.resume() == path and calls[-1] == ("resumed", 3)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), fresh_model.state_dict().values()))
    saved_moments = [s["exp_avg"] for s in optimizer.state_dict()["state"].values()]
    restored_moments = [s["exp_avg"] for s in fresh_optimizer.state_dict()["state"].values()]
    assert len(restored_moments) == len(saved_moments) > 0
    assert all(torch.equal(a, b) for a, b in zip(saved_moments, restored_moments))
    assert fresh_scheduler.state_dict() == scheduler.state_dict()
    assert fresh_state == state and fresh_counter.count == 8
    assert fresh_window.state_dict() == {**window.state_dict(), "loss_sum": 0.75}
