"""trainer.classify end to end (real processes, 1 and 2 ranks), length-grouped sampling, bad input."""
from __future__ import annotations

import json
import os

import pytest
import torch

from classify_helpers import TINY, classify_args, mlm_checkpoint, read_predictions, save_tiny, sentiment  # noqa: F401
from conftest import REPO_ROOT, accelerate_launch, load_parameters, read_results, relative_difference, run_job
from trainer.data.samplers import GlobalBatchSampler


def test_end_to_end_from_an_mlm_checkpoint_with_predictions(sentiment, mlm_checkpoint, job_env, tmp_path):
    out = tmp_path / "run"
    result = run_job("trainer.classify", classify_args(
        sentiment, out, "--model_name_or_path", mlm_checkpoint, "--max_steps", "40", "--group_by_length",
        "--report_to", "tensorboard", "--do_predict", "--test_file", sentiment["validation"]), job_env)
    results = read_results(out)
    for key in ("eval_accuracy", "eval_f1", "eval_matthews_correlation", "init_eval_accuracy", "eval_loss"):
        assert isinstance(results[key], float)
    matrix = results["eval_confusion_matrix"]
    assert sum(map(sum, matrix)) == 100  # every validation sentence counted once
    assert results["eval_accuracy"] == (matrix[0][0] + matrix[1][1]) / 100
    assert "newly initialised (not in the checkpoint): bert.pooler.dense.bias, bert.pooler.dense.weight, " \
           "classifier.bias, classifier.weight" in result.stdout
    assert "confusion matrix (rows: true, columns: predicted)" in result.stdout
    with open(out / "config.json") as handle:
        assert json.load(handle)["id2label"] == {"0": "negative", "1": "positive"}
    predictions = read_predictions(out)
    assert [row["id"] for row in predictions] == list(range(100))
    assert all(abs(sum(row["probabilities"].values()) - 1) < 1e-5 for row in predictions)
    assert all(row["label"] == max(row["probabilities"], key=row["probabilities"].get) for row in predictions)
    with open(sentiment["validation"]) as handle:  # the test file was the validation file: same accuracy
        truth = [json.loads(line)["label"] for line in handle]
    assert sum(row["label"] == label for row, label in zip(predictions, truth)) / 100 == results["eval_accuracy"]
    assert any(name.startswith("events.out.tfevents") for name in os.listdir(out / "runs"))
    # The closing summary (jobs.finish_job, shared by every job): where the model is, how to load it, the curves.
    assert f"load it: from transformers import pipeline; pipe = pipeline('text-classification', model='{out}')" \
           in result.stdout
    assert f"curves:  tensorboard --logdir {out / 'runs'}" in result.stdout


@pytest.mark.slow
def test_one_and_two_processes_report_identical_metrics(sentiment, mlm_checkpoint, job_env, tmp_path):
    """Same global batch (8 x 1 rank vs 4 x 2 ranks) with length grouping and gradual unfreezing under DDP."""
    common = ["--model_name_or_path", mlm_checkpoint, "--max_steps", "6", "--group_by_length", "--weight_decay",
              "0.1", "--finetune_strategy", "gradual_unfreeze", "--unfreeze_every", "2", "--eval_steps", "3",
              "--per_device_eval_batch_size", "7"]  # 100 = 2 x 7 x 7 + 2: a remainder on every rank
    one, two = tmp_path / "one", tmp_path / "two"
    run_job("trainer.classify", classify_args(sentiment, one, *common), job_env)
    run_job("trainer.classify", classify_args(sentiment, two, *common, "--per_device_train_batch_size", "4"),
            job_env, nproc=2)
    first, second = read_results(one), read_results(two)
    for key in ("init_eval_accuracy", "eval_accuracy", "eval_f1", "eval_matthews_correlation",
                "eval_confusion_matrix"):
        assert first[key] == second[key], key
    assert first["eval_loss"] == pytest.approx(second["eval_loss"], rel=1e-5)
    before, after = load_parameters(one), load_parameters(two)
    for name in before:
        torch.testing.assert_close(after[name], before[name], rtol=1e-5, atol=1e-6)
    # Opened last (update 4 of 0..5): the embeddings trained under DDP after being masked at start-up.
    initial = load_parameters(mlm_checkpoint)
    assert not torch.equal(before["bert.embeddings.word_embeddings.weight"],
                           initial["bert.embeddings.word_embeddings.weight"])


@pytest.mark.slow
def test_adapters_under_every_launcher_predict_and_train_as_one_process_does(sentiment, mlm_checkpoint, job_env,
                                                                               tmp_path):
    """Bottleneck adapters (test_adapters.py) under DDP, ZeRO-3 and FSDP2 (where every rank holds a shard of each
    weight, so prediction must run on all ranks together): the same adapter and head weights and predictions as one
    process, and the base encoder bit-identical (the saved fingerprint of the final weights is the MLM checkpoint's).
    ZeRO-2, whose ranks hold whole weights as DDP's do, is left to the full-model comparisons of test_deepspeed.py."""
    from safetensors.torch import load_file

    from classify_helpers import adapter_manifest as manifest, base_parameters_sha256
    from trainer.layout import ADAPTER_WEIGHTS_FILE

    common = ["--model_name_or_path", mlm_checkpoint, "--max_steps", "4", "--do_predict", "--test_file",
              sentiment["validation"], "--finetune_strategy", "adapter", "--adapter_reduction_factor", "8",
              "--learning_rate", "1e-2"]
    one, ddp, zero3, fsdp = (tmp_path / name for name in ("one", "ddp", "zero3", "fsdp"))
    run_job("trainer.classify", classify_args(sentiment, one, *common), job_env)
    sharded = [*common, "--per_device_train_batch_size", "4"]
    run_job("trainer.classify", classify_args(sentiment, ddp, *sharded), job_env, nproc=2)
    run_job("trainer.classify", classify_args(sentiment, zero3, *sharded, "--deepspeed", os.path.join(
        REPO_ROOT, "ds_configs", "zero3.json")), job_env, nproc=2)
    result = run_job("trainer.classify", classify_args(sentiment, fsdp, *sharded), job_env, nproc=2,
                     launcher=accelerate_launch("cpu_fsdp2.yaml"))
    assert "with FSDP2 (gloo): 8 sequences/step" in result.stdout + result.stderr
    assert manifest(one)["base_parameters_sha256"] == base_parameters_sha256(mlm_checkpoint)
    reference = load_file(os.path.join(one, ADAPTER_WEIGHTS_FILE))
    assert all(torch.count_nonzero(t) > 0 for name, t in reference.items() if ".up.weight" in name)  # trained
    expected = read_predictions(one)
    for run in (ddp, zero3, fsdp):
        assert manifest(run)["base_parameters_sha256"] == manifest(one)["base_parameters_sha256"], run
        assert read_results(run)["eval_accuracy"] == read_results(one)["eval_accuracy"]
        assert relative_difference(reference, load_file(os.path.join(run, ADAPTER_WEIGHTS_FILE))) <= 1e-5, run
        predicted = read_predictions(run)
        assert [row["id"] for row in predicted] == list(range(100))
        for mine, theirs in zip(predicted, expected):
            assert mine["label"] == theirs["label"]
            assert list(mine["probabilities"].values()) == pytest.approx(list(theirs["probabilities"].values()),
                                                                         abs=1e-5)


def global_steps(world_size: int, per_device: int, lengths, epoch: int) -> list[list[int]]:
    """The samples of every optimizer step, over all ranks, for a given split of the same global batch."""
    steps = None
    for rank in range(world_size):
        sampler = GlobalBatchSampler(len(lengths), per_device, world_size, rank, 16 // (per_device * world_size),
                                     seed=3, lengths=lengths)
        micro = list(sampler.batches(epoch))
        per_step = 16 // (per_device * world_size)
        rank_steps = [sum(micro[i:i + per_step], []) for i in range(0, len(micro), per_step)]
        steps = rank_steps if steps is None else [a + b for a, b in zip(steps, rank_steps)]
    return [sorted(step) for step in steps]


def test_length_grouping_is_world_size_independent_and_cuts_padding():
    generator = torch.Generator().manual_seed(0)
    lengths = torch.randint(4, 200, (1000,), generator=generator).tolist()
    reference = global_steps(1, 16, lengths, epoch=0)
    assert global_steps(2, 4, lengths, epoch=0) == reference == global_steps(4, 2, lengths, epoch=0)
    seen = [i for step in reference for i in step]
    assert len(seen) == len(set(seen)) == 1000 - 1000 % 16
    assert global_steps(1, 16, lengths, epoch=1) != reference  # reshuffled every epoch

    def padded_tokens(steps):
        return sum(len(step) * max(lengths[i] for i in step) for step in steps)

    plain = GlobalBatchSampler(1000, 16, 1, 0, 1, seed=3)
    assert padded_tokens(reference) < 0.6 * padded_tokens([batch for batch in plain])


# ------------------------------------------------------------------------------------------------- bad input
def write_jsonl(path, rows) -> str:
    with open(path, "w") as handle:
        handle.writelines(json.dumps(row) + "\n" for row in rows)
    return str(path)


def bad_inputs(tmp_path, sentiment, tokenizer_dir):
    from transformers import BertConfig, BertForSequenceClassification, DistilBertConfig, DistilBertForMaskedLM

    rows = [{"sentence": "great film .", "label": "positive"}, {"sentence": "dull film .", "label": "negative"}] * 8
    latin1 = tmp_path / "latin1.csv"
    latin1.write_bytes("sentence,label\ncaf\u00e9 film,positive\nbad film,negative\n".encode("latin-1"))
    # shares one label with the training data (positive, negative): too few to distil on
    one_shared = save_tiny(tmp_path / "teacher3", BertForSequenceClassification, BertConfig, tokenizer_dir,
                           id2label={0: "positive", 1: "neutral", 2: "mixed"}, **TINY)
    distilbert = save_tiny(tmp_path / "distilbert", DistilBertForMaskedLM, DistilBertConfig, tokenizer_dir, dim=32,
                           n_layers=1, n_heads=2, hidden_dim=64)
    train = sentiment["train"]
    return {
        "no label column": (["--train_file", write_jsonl(tmp_path / "nolabel.jsonl", [{"sentence": "x"}] * 8)],
                            "no label column 'label'"),
        "no text column": (["--train_file", train, "--text_column", "review"], "review"),
        "single class": (["--train_file", write_jsonl(tmp_path / "one.jsonl", rows[:1] * 8)], "single class"),
        "float labels": (["--train_file", write_jsonl(tmp_path / "float.jsonl", [{"sentence": "x", "label": 0.5},
                                                                               {"sentence": "y", "label": 1.5}] * 4)],
                         "integers or strings"),
        "non-UTF-8": (["--train_file", str(latin1)], "could not be read"),
        "unseen validation label": (["--train_file", train, "--validation_file", write_jsonl(
            tmp_path / "val.jsonl", rows + [{"sentence": "meh", "label": "neutral"}])], "never seen in training: neutral"),
        "teacher labels": (["--train_file", train, "--tokenizer_name", tokenizer_dir, "--teacher", one_shared],
                           "1 label(s) in common; distillation needs a teacher that shares at least two labels"),
        "peft architecture": (["--train_file", train, "--model_name_or_path", distilbert, "--finetune_strategy",
                               "lora"], "not possible on a distilbert model"),
        "gradual unfreezing under DeepSpeed": (["--train_file", train, "--finetune_strategy", "gradual_unfreeze",
                                                "--deepspeed", os.path.join(REPO_ROOT, "ds_configs", "zero2.json")],
                                               "run it without DeepSpeed"),
    }


CASES = ["no label column", "no text column", "single class", "float labels", "non-UTF-8", "unseen validation label",
         "teacher labels", "peft architecture", "gradual unfreezing under DeepSpeed"]


@pytest.mark.parametrize("case", CASES)
def test_bad_input_is_one_line_exit_2_and_writes_nothing(case, sentiment, tokenizer_dir, tmp_path, capsys):
    from trainer.classify import main

    argv, expected = bad_inputs(tmp_path, sentiment, tokenizer_dir)[case]
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_info:
        main([*argv, "--output_dir", str(out), "--max_steps", "2", "--report_to", "none"])
    assert exit_info.value.code == 2
    stderr = capsys.readouterr().err.strip().splitlines()
    assert stderr[-1].startswith("error: ") and expected in stderr[-1], stderr
    assert not out.exists()


def test_bad_input_from_a_real_process(sentiment, job_env, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("earlier run")
    result = run_job("trainer.classify", ["--train_file", sentiment["train"], "--output_dir", str(out)], job_env,
                     check=False)
    assert result.returncode == 2 and result.stderr.strip().startswith("error: --output_dir")
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert os.listdir(out) == ["keep.txt"]


def test_best_checkpoint_is_picked_by_accuracy_without_naming_the_metric(sentiment, mlm_checkpoint, job_env, tmp_path):
    out = tmp_path / "best"
    run_job("trainer.classify", classify_args(sentiment, out, "--model_name_or_path", mlm_checkpoint, "--max_steps",
                                              "12", "--save_steps", "4", "--load_best_model_at_end"), job_env)
    results = read_results(out)
    with open(out / "log_history.jsonl") as handle:
        evaluations = [json.loads(line) for line in handle if '"eval_accuracy"' in line]
    accuracy_at = {record["step"]: record["eval_accuracy"] for record in evaluations if record["step"] in (4, 8, 12)}
    best_step = max(sorted(accuracy_at), key=accuracy_at.get)  # the first of equals, as the checkpointer keeps it
    assert results["best_metric"] == accuracy_at[best_step]
    assert results["best_model_checkpoint"] == f"checkpoint-{best_step}"
