"""Fine-tuning strategies: exactly the intended parameters change, everything else stays bit-identical.

Runs are in-process (`trainer.classify.main`) to save the interpreter start-up per strategy; test_classify.py
covers real subprocess and torchrun runs. Weight decay is on in every run: a frozen parameter that merely got a
zero gradient would still decay, so these tests also catch "frozen" layers that are only zero-graded.
"""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import changed_tensors, saved_tensor_names
from classify_helpers import classify_args, mlm_checkpoint, read_predictions, sentiment  # noqa: F401 (fixtures)
from trainer.classify import ClassificationTask, main
from trainer.errors import UsageError
from trainer.continual.distillation import SharedLabels, distillation_loss, load_teacher

STEPS = ["--max_steps", "3", "--weight_decay", "0.1"]


def run(sentiment, mlm_checkpoint, out, *extra):
    main(classify_args(sentiment, out, "--model_name_or_path", mlm_checkpoint, *STEPS, *extra))
    return out


def changed_base_tensors(mlm_checkpoint, out) -> set[str]:
    """Names of the starting checkpoint's encoder tensors that differ (bitwise) in the trained model."""
    return changed_tensors(mlm_checkpoint, out, "bert.")


def base_names(mlm_checkpoint) -> set[str]:
    return saved_tensor_names(mlm_checkpoint, "bert.")


def test_full_changes_every_tensor_and_reloads_with_identical_predictions(sentiment, mlm_checkpoint, tmp_path):
    from transformers import AutoModelForSequenceClassification

    out = run(sentiment, mlm_checkpoint, tmp_path / "full", "--do_predict", "--test_file", sentiment["validation"])
    assert changed_base_tensors(mlm_checkpoint, out) == base_names(mlm_checkpoint)
    model = AutoModelForSequenceClassification.from_pretrained(out)
    assert model.config.id2label == {0: "negative", 1: "positive"}
    assert_reloaded_model_reproduces_predictions(model, out, sentiment)


def assert_reloaded_model_reproduces_predictions(model, out, sentiment):
    import json

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(out)
    with open(sentiment["validation"]) as handle:
        texts = [json.loads(line)["sentence"] for line in handle][:8]
    with torch.no_grad():
        encoded = tokenizer(texts, padding=True, truncation=True, max_length=64, return_tensors="pt")
        probabilities = model.eval()(**encoded).logits.softmax(-1)
    written = read_predictions(out)[:8]
    expected = torch.tensor([[row["probabilities"]["negative"], row["probabilities"]["positive"]] for row in written])
    torch.testing.assert_close(probabilities, expected, rtol=1e-4, atol=1e-5)


def test_freeze_keeps_embeddings_and_lowest_layers(sentiment, mlm_checkpoint, tmp_path):
    out = run(sentiment, mlm_checkpoint, tmp_path / "freeze", "--finetune_strategy", "freeze", "--freeze_layers", "1")
    names = base_names(mlm_checkpoint)
    assert changed_base_tensors(mlm_checkpoint, out) == {n for n in names if n.startswith("bert.encoder.layer.1.")}


def test_bitfit_changes_only_biases(sentiment, mlm_checkpoint, tmp_path):
    out = run(sentiment, mlm_checkpoint, tmp_path / "bitfit", "--finetune_strategy", "bitfit")
    assert changed_base_tensors(mlm_checkpoint, out) == {n for n in base_names(mlm_checkpoint) if n.endswith(".bias")}


@pytest.mark.parametrize("every, opened", [(100, ("layer.1.",)), (2, ("layer.1.", "layer.0."))])
def test_gradual_unfreeze_opens_layers_top_down(sentiment, mlm_checkpoint, tmp_path, every, opened):
    # 3 updates: with every=2 the update at step 2 opens layer 0; the embeddings (next in line) never open.
    out = run(sentiment, mlm_checkpoint, tmp_path / "gradual", "--finetune_strategy", "gradual_unfreeze",
              "--unfreeze_every", str(every))
    expected = {n for n in base_names(mlm_checkpoint) if any(n.startswith(f"bert.encoder.{p}") for p in opened)}
    assert changed_base_tensors(mlm_checkpoint, out) == expected


def test_lora_trains_adapters_only_reloads_and_merges(sentiment, mlm_checkpoint, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    out = run(sentiment, mlm_checkpoint, tmp_path / "lora", "--finetune_strategy", "lora", "--merge_adapters",
              "--do_predict", "--test_file", sentiment["validation"])
    adapters = load_file(os.path.join(out, "adapter_model.safetensors"))
    assert any("lora_B" in name for name in adapters)
    assert all(torch.count_nonzero(t) > 0 for name, t in adapters.items() if "lora_B" in name)  # B starts at zero
    base = AutoModelForSequenceClassification.from_pretrained(mlm_checkpoint, num_labels=2)
    reloaded = PeftModel.from_pretrained(base, out)
    assert_reloaded_model_reproduces_predictions(reloaded, out, sentiment)
    merged = os.path.join(out, "merged")
    adapted = {n for n in base_names(mlm_checkpoint)
               if n.endswith(("attention.self.query.weight", "attention.self.value.weight"))}
    assert changed_base_tensors(mlm_checkpoint, merged) == adapted
    merged_model = AutoModelForSequenceClassification.from_pretrained(merged)
    assert merged_model.config.label2id == {"negative": 0, "positive": 1}
    assert_reloaded_model_reproduces_predictions(merged_model, out, sentiment)


def test_lora_resumes_from_its_checkpoint_to_the_same_adapters(sentiment, mlm_checkpoint, tmp_path):
    """A peft checkpoint holds the adapters only (adapter_model.safetensors): resume reads them back."""
    import shutil

    lora = ["--finetune_strategy", "lora", "--save_steps", "2"]
    straight = run(sentiment, mlm_checkpoint, tmp_path / "straight", *lora)
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(straight / "checkpoint-2", resumed / "checkpoint-2")
    run(sentiment, mlm_checkpoint, resumed, *lora)
    expected, got = (load_file(os.path.join(d, "adapter_model.safetensors")) for d in (straight, resumed))
    assert got.keys() == expected.keys() and all(torch.equal(got[n], expected[n]) for n in expected)
    assert any(not torch.equal(got[n], load_file(os.path.join(straight, "checkpoint-2", "adapter_model.safetensors"))[n])
               for n in got)  # the resumed run trained on


def test_prompt_tuning_trains_virtual_tokens_and_reloads(sentiment, mlm_checkpoint, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    out = run(sentiment, mlm_checkpoint, tmp_path / "prompt", "--finetune_strategy", "prompt",
              "--num_virtual_tokens", "4", "--do_predict", "--test_file", sentiment["validation"])
    # Only the virtual tokens and the classification head are saved: the encoder was never trainable.
    adapters = load_file(os.path.join(out, "adapter_model.safetensors"))
    assert any("prompt_embeddings" in name for name in adapters)
    assert all(any(part in name for part in ("prompt_embeddings", "classifier.", "pooler.")) for name in adapters)
    base = AutoModelForSequenceClassification.from_pretrained(mlm_checkpoint, num_labels=2)
    reloaded = PeftModel.from_pretrained(base, out)
    assert_reloaded_model_reproduces_predictions(reloaded, out, sentiment)


def test_prefix_tuning_on_an_encoder_without_past_key_values_is_refused(sentiment, mlm_checkpoint, tmp_path, capsys):
    out = tmp_path / "prefix"
    with pytest.raises(SystemExit) as exit_info:
        run(sentiment, mlm_checkpoint, out, "--finetune_strategy", "prefix", "--num_virtual_tokens", "4")
    assert exit_info.value.code == 2
    error_lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1 and "--finetune_strategy prefix needs a model that takes past_key_values" in \
        error_lines[0]
    assert not out.exists() or not os.listdir(out)


def softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def test_distillation_loss_matches_hand_computation():
    student = np.array([[1.0, -0.5, 0.2], [0.3, 0.9, -1.2]])
    teacher = np.array([[2.0, 0.1, -0.4], [-0.7, 1.5, 0.0]])
    labels = np.array([0, 2])
    temperature, alpha = 3.0, 0.7

    p_teacher, p_student = softmax(teacher / temperature), softmax(student / temperature)
    kl = (p_teacher * (np.log(p_teacher) - np.log(p_student))).sum(-1)
    ce = -np.log(softmax(student)[np.arange(2), labels])
    expected = alpha * kl * temperature ** 2 + (1 - alpha) * ce
    got = distillation_loss(torch.tensor(student), torch.tensor(teacher), torch.tensor(labels), temperature, alpha)
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-12)


def test_distillation_on_shared_labels_matches_hand_computation(tmp_path):
    """A teacher with other labels: matched by name, the KL over the shared ones renormalised, the rest refused."""
    from transformers import BertConfig, BertForSequenceClassification

    from classify_helpers import TINY

    teacher_labels = {0: "positive", 1: "spam", 2: "negative", 3: "mixed"}
    BertForSequenceClassification(BertConfig(vocab_size=50, id2label=teacher_labels, **TINY)).save_pretrained(
        tmp_path / "teacher")
    _, shared = load_teacher(str(tmp_path / "teacher"), {0: "negative", 1: "neutral", 2: "positive"}, "cpu")
    assert shared == SharedLabels(student=[0, 2], teacher=[2, 0])
    student = np.array([[1.0, -0.5, 0.2], [0.3, 0.9, -1.2]])
    teacher = np.array([[2.0, 0.1, -0.4, 0.7], [-0.7, 1.5, 0.0, -2.0]])
    labels = np.array([1, 2])
    temperature, alpha = 3.0, 0.7
    # negative and positive only: the student's columns 0 and 2 against the teacher's 2 and 0, each softmaxed alone
    p_teacher, p_student = softmax(teacher[:, [2, 0]] / temperature), softmax(student[:, [0, 2]] / temperature)
    kl = (p_teacher * (np.log(p_teacher) - np.log(p_student))).sum(-1)
    ce = -np.log(softmax(student)[np.arange(2), labels])  # the hard term: all three student classes
    expected = alpha * kl * temperature ** 2 + (1 - alpha) * ce
    got = distillation_loss(torch.tensor(student), torch.tensor(teacher), torch.tensor(labels), temperature, alpha,
                            shared)
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-12)
    with pytest.raises(UsageError, match=r"1 label\(s\) in common; distillation needs .* at least two labels"):
        load_teacher(str(tmp_path / "teacher"), {0: "positive", 1: "neutral"}, "cpu")


@pytest.mark.parametrize("shared", [None, SharedLabels(student=[1, 0], teacher=[0, 2])], ids=["same", "shared"])
def test_distillation_task_sums_per_sample_losses_and_leaves_the_teacher_alone(shared):
    from transformers import BertConfig, BertForSequenceClassification

    from classify_helpers import TINY

    torch.manual_seed(0)
    student, teacher = (BertForSequenceClassification(BertConfig(vocab_size=50, num_labels=labels, **TINY))
                        for labels in (2, 2 if shared is None else 3))
    task = ClassificationTask(student, teacher.eval().requires_grad_(False), temperature=2.0, alpha=0.25,
                              shared_labels=shared)
    assert not any(p is q for p in task.parameters() for q in teacher.parameters())  # not a submodule: no DDP
    batch = {"input_ids": torch.randint(5, 50, (4, 9)), "attention_mask": torch.ones(4, 9, dtype=torch.long)}
    labels = torch.tensor([0, 1, 1, 0])
    output = task.train()(**batch, labels=labels)
    output["loss_sum"].backward()
    with torch.no_grad():
        expected = distillation_loss(student(**batch).logits, teacher(**batch).logits, labels, 2.0, 0.25,
                                     shared).sum()
    torch.testing.assert_close(output["loss_sum"], expected)
    assert all(p.grad is None for p in teacher.parameters())
    eval_loss = task.eval()(**batch, labels=labels)["loss_sum"]  # evaluation: the plain hard-label loss
    torch.testing.assert_close(eval_loss, torch.nn.functional.cross_entropy(student(**batch).logits, labels,
                                                                            reduction="sum"))


def test_distillation_run_leaves_the_student_trained_and_the_teacher_untouched(sentiment, mlm_checkpoint, tmp_path):
    teacher = run(sentiment, mlm_checkpoint, tmp_path / "teacher")
    teacher_weights = load_file(os.path.join(teacher, "model.safetensors"))
    student = run(sentiment, mlm_checkpoint, tmp_path / "student", "--teacher_model_name_or_path", str(teacher),
                  "--distill_alpha", "0.5", "--distill_temperature", "2")
    assert changed_base_tensors(mlm_checkpoint, student) == base_names(mlm_checkpoint)
    after = load_file(os.path.join(teacher, "model.safetensors"))
    assert all(torch.equal(teacher_weights[n], after[n]) for n in teacher_weights)


@pytest.mark.parametrize("strategy, weights", [("lora", "adapter_model.safetensors"),
                                               ("adapter", "ADAPTER_WEIGHTS_FILE")])
def test_gradient_checkpointing_trains_the_adapters_of_classify_to_the_same_weights(sentiment, mlm_checkpoint,
                                                                                    tmp_path, strategy, weights):
    """trainer.classify with --gradient_checkpointing over peft's LoRA and the bottleneck adapters: each block runs
    again in the backward (dropout drawing the same masks), and the trained weights are those of a plain run."""
    import trainer.layout
    from conftest import relative_difference

    weights = getattr(trainer.layout, weights, weights)
    plain, checkpointed = (run(sentiment, mlm_checkpoint, tmp_path / name, "--finetune_strategy", strategy, *extra)
                           for name, extra in (("plain", []), ("checkpointed", ["--gradient_checkpointing"])))
    expected, got = (load_file(os.path.join(out, weights)) for out in (plain, checkpointed))
    assert got.keys() == expected.keys()
    assert relative_difference(expected, got) <= 1e-5
    zero_at_the_start = [name for name in expected if "lora_B" in name or ".up.weight" in name]
    assert zero_at_the_start and all(torch.count_nonzero(expected[name]) > 0 for name in zero_at_the_start)
