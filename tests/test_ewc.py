"""EWC in the engine (trainer.continual.ewc), in this process: the penalty's gradient by value, once per optimizer step,
exact resume, bad input. trainer.mlm's engine (the tests' tiny BERT without dropout) with a made-up EWC file
(ewc_helpers); the gradient the update uses is read at the optimizer's step.

Under real processes (test_clm_launch.py, whose DDP, ZeRO-3 and FSDP2 runs train with EWC and --save_fisher): the
penalty on ZeRO-3 partitions and FSDP2 shards matches DDP, an FSDP2 run with EWC resumes bit-exactly, and the
Fisher of 2 processes equals that of one by value.
"""
import copy
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import fails_cleanly, load_parameters, mlm_args, read_history
from ewc_helpers import STRENGTH, ewc_flags, job_environment, write_made_up_fisher
from test_gpu_step import engine_for
from trainer.continual.ewc import ANCHOR, FISHER
from trainer.layout import FISHER_FILE


@pytest.fixture
def in_process(job_env, monkeypatch):
    job_environment(monkeypatch, job_env)


@pytest.fixture(scope="module")
def made_up_fisher(corpus, tokenizer_dir, job_env, tmp_path_factory) -> str:
    directory = tmp_path_factory.mktemp("made-up-fisher")
    with pytest.MonkeyPatch.context() as patch:
        job_environment(patch, job_env)
        engine = engine_for(mlm_args(corpus, tokenizer_dir, directory / "unused", "--max_steps", "1",
                                     "--peak_tflops", "1"))
    return write_made_up_fisher(engine, directory)


def ewc_engine(corpus, tokenizer_dir, fisher_dir, output_dir, *extra):
    return engine_for(mlm_args(corpus, tokenizer_dir, output_dir, "--max_steps", "4", "--max_grad_norm", "0",
                               "--peak_tflops", "1", "--max_eval_samples", "8", *ewc_flags(fisher_dir), *extra))


def one_step(engine):
    """The gradients the update of one optimizer step uses ({name: tensor}), and the step's logging window."""
    from trainer.engine.loop import Window

    named = list(engine.accelerator.unwrap_model(engine.model).named_parameters())
    seen = {}

    def read_gradients(*_):
        seen.update({name: parameter.grad.clone() for name, parameter in named if parameter.grad is not None})

    engine.optimizer.optimizer.register_step_pre_hook(read_gradients)
    batches, window = engine.data.micro_batches(), Window(engine.accelerator.device)
    engine.optimizer_step([next(batches) for _ in range(engine.settings.accumulation_steps)], window)
    return seen, window


def test_penalty_gradient_is_the_autograd_gradient_of_the_penalty(corpus, tokenizer_dir, made_up_fisher, tmp_path,
                                                                  in_process):
    engine = ewc_engine(corpus, tokenizer_dir, made_up_fisher, tmp_path / "run", "--per_device_train_batch_size", "8")
    model = engine.accelerator.unwrap_model(engine.model)
    named = dict(model.named_parameters())
    batch = next(engine.data.micro_batches())
    # By hand, on the parameters before the step: d(mean data loss) + d((L/2) sum F (theta - theta*)^2).
    items = batch["num_loss_items"]
    inputs = {k: v for k, v in copy.deepcopy(batch).items() if k not in ("num_loss_items", "sample_id")}
    data = torch.autograd.grad(model(**inputs)["loss_sum"] / items, list(named.values()))
    saved = load_file(os.path.join(made_up_fisher, FISHER_FILE))
    thetas = {name: p.detach().clone().requires_grad_() for name, p in named.items()}
    penalty = STRENGTH / 2 * sum((saved[FISHER + n] * (t - saved[ANCHOR + n]) ** 2).sum() for n, t in thetas.items())
    by_hand = dict(zip(thetas, torch.autograd.grad(penalty, list(thetas.values()))))
    engine.data.micro_batches = lambda: iter([batch])
    gradients, window = one_step(engine)
    assert gradients.keys() == named.keys()
    for (name, expected_data), expected_penalty in zip(zip(named, data), by_hand.values()):
        torch.testing.assert_close(gradients[name], expected_data + expected_penalty, rtol=1e-5, atol=1e-7)
    assert window.ewc_penalty.item() == pytest.approx(penalty.item(), rel=1e-6)  # (by hand: a float32 sum)
    penalty_norm = sum(float(g.norm() ** 2) for g in by_hand.values()) ** 0.5
    data_norm = sum(float(g.norm() ** 2) for g in data) ** 0.5
    assert penalty_norm > 0.3 * data_norm  # the penalty's part is no rounding error


def test_penalty_is_added_once_per_optimizer_step_not_per_micro_batch(corpus, tokenizer_dir, made_up_fisher,
                                                                      tmp_path, in_process):
    """One optimizer step of 8 samples: batch 8 x accumulation 1 and batch 2 x accumulation 4 use one gradient."""
    whole, _ = one_step(ewc_engine(corpus, tokenizer_dir, made_up_fisher, tmp_path / "whole",
                                   "--per_device_train_batch_size", "8"))
    split, window = one_step(ewc_engine(corpus, tokenizer_dir, made_up_fisher, tmp_path / "split",
                                        "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "4"))
    assert whole.keys() == split.keys()
    for name in whole:
        torch.testing.assert_close(split[name], whole[name], rtol=1e-5, atol=1e-7)
    assert window.ewc_penalty.item() > 0


def test_resume_with_ewc_is_bit_exact_and_logs_the_same_penalties(corpus, tokenizer_dir, made_up_fisher, tmp_path,
                                                                  in_process):
    """Stopped at step 2 inside a 3-step logging window: the checkpoint carries the window's penalty sum."""
    extra = ("--logging_steps", "3", "--save_steps", "2", "--per_device_train_batch_size", "4")
    uninterrupted = tmp_path / "uninterrupted"
    ewc_engine(corpus, tokenizer_dir, made_up_fisher, uninterrupted, *extra).train()
    resumed = tmp_path / "resumed"
    ewc_engine(corpus, tokenizer_dir, made_up_fisher, resumed, *extra, "--resume_from_checkpoint",
               str(uninterrupted / "checkpoint-2")).train()
    expected, actual = load_parameters(uninterrupted), load_parameters(resumed)
    assert all(torch.equal(expected[name], actual[name]) for name in expected)

    def penalties(directory):
        return [(r["step"], r["train_ewc_penalty"]) for r in read_history(directory) if "train_ewc_penalty" in r]

    assert penalties(resumed)[-1] == penalties(uninterrupted)[-1] and penalties(uninterrupted)[-1][0] == 4
    assert penalties(uninterrupted)[0][1] > 0


# ------------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("flags, message", [
    (["--ewc_from", "{missing}", "--ewc_lambda", "1"], "error: --ewc_from {missing}: no such directory"),
    (["--ewc_from", "{empty}", "--ewc_lambda", "1"],
     f"error: --ewc_from {{empty}} holds no {FISHER_FILE}; train the earlier task with --save_fisher"),
    (["--ewc_from", "{fisher}", "--ewc_lambda", "-1"], "error: --ewc_lambda must be a number >= 0, got -1.0"),
    (["--ewc_from", "{fisher}", "--ewc_lambda", "nan"], "error: --ewc_lambda must be a number >= 0, got nan"),
    (["--ewc_from", "{fisher}"], "error: --ewc_from DIR and --ewc_lambda L go together: give both (EWC) or neither"),
    (["--ewc_lambda", "1"], "error: --ewc_from DIR and --ewc_lambda L go together: give both (EWC) or neither"),
    (["--save_fisher", "--fisher_samples", "0"], "error: --fisher_samples must be positive, got 0"),
], ids=["missing_dir", "no_file", "negative_lambda", "nan_lambda", "no_lambda", "lambda_alone", "no_samples"])
def test_bad_ewc_arguments_are_refused_before_anything_is_written(corpus, tokenizer_dir, made_up_fisher, tmp_path,
                                                                  capsys, in_process, flags, message):
    from trainer.mlm import main

    paths = {"missing": str(tmp_path / "missing"), "empty": str(tmp_path), "fisher": made_up_fisher}
    out = tmp_path / "out"
    argv = mlm_args(corpus, tokenizer_dir, out, "--max_steps", "1") + [flag.format(**paths) for flag in flags]
    assert fails_cleanly(main, argv, capsys) == message.format(**paths)
    assert not out.exists()


def edited_fisher(source: str, directory, edit) -> str:
    """A copy of `source`'s FISHER_FILE in `directory`, its tensors changed by `edit(dict)`."""
    tensors = load_file(os.path.join(source, FISHER_FILE))
    edit(tensors)
    directory.mkdir()
    save_file(tensors, str(directory / FISHER_FILE))
    return str(directory)


def renamed(tensors):
    for prefix in (FISHER, ANCHOR):
        tensors[prefix + "hf_model.bert.no_such.weight"] = tensors.pop(prefix + "hf_model.bert.embeddings.LayerNorm.bias")


def reshaped(tensors):
    for prefix in (FISHER, ANCHOR):
        tensors[prefix + "hf_model.cls.predictions.bias"] = torch.zeros(7)


@pytest.mark.parametrize("edit, message", [
    (renamed, "parameters are not in this model (e.g. hf_model.bert.no_such.weight); give the output directory of a "
              "run of the same model and job"),
    (reshaped, "hf_model.cls.predictions.bias has shape (7,) there but (1024,) in this model (e.g. another label set "
               "or vocabulary); EWC needs the same architecture"),
    (None, "cannot read"),
], ids=["unknown_name", "other_shape", "not_safetensors"])
def test_an_ewc_file_that_does_not_fit_the_model_is_refused(corpus, tokenizer_dir, made_up_fisher, tmp_path, capsys,
                                                           in_process, edit, message):
    from trainer.mlm import main

    if edit is None:
        (tmp_path / "bad").mkdir()
        (tmp_path / "bad" / FISHER_FILE).write_text("not a safetensors file")
        directory = str(tmp_path / "bad")
    else:
        directory = edited_fisher(made_up_fisher, tmp_path / "bad", edit)
    out = tmp_path / "out"
    argv = mlm_args(corpus, tokenizer_dir, out, "--max_steps", "1", "--ewc_from", directory, "--ewc_lambda", "1")
    line = fails_cleanly(main, argv, capsys)
    assert line.startswith(f"error: --ewc_from {directory}") and message in line, line
    assert not out.exists()
