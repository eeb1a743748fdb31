"""Bottleneck adapters (trainer.finetune.adapters, `--finetune_strategy adapter`): identity at step 0, only the adapter
and its head train, adapter-only output that loads into a pipeline, a second task beside the first that leaves the
first bit-identical, exact resume, bad input. In-process runs (`trainer.classify.main`); the multi-process runs
(ZeRO-3, FSDP2) are in test_classify.py."""
from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file

from classify_helpers import (adapter_manifest as manifest, base_parameters_sha256, classify_args,  # noqa: F401
                              mlm_checkpoint, read_predictions, sentiment)
from trainer.classify import main
from trainer.errors import UsageError
from trainer.finetune.adapters import AdapterSlot, add_adapter, load_adapter_model, set_active_adapter
from trainer.layout import ADAPTER_MANIFEST_FILE, ADAPTER_WEIGHTS_FILE

STEPS = ["--max_steps", "4", "--weight_decay", "0.1", "--learning_rate", "1e-2"]
TASK_B_LABELS = ["few", "some", "many"]


def tiny_models():
    from transformers import (BertConfig, BertForSequenceClassification, DistilBertConfig,
                              DistilBertForSequenceClassification, ModernBertConfig,
                              ModernBertForSequenceClassification)

    common = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, num_labels=3)
    return {"bert": lambda: BertForSequenceClassification(BertConfig(vocab_size=60, **common)),
            "modernbert": lambda: ModernBertForSequenceClassification(ModernBertConfig(  # the mlm demo's architecture
                vocab_size=64, pad_token_id=0, bos_token_id=1, eos_token_id=2, cls_token_id=1, sep_token_id=2,
                **common)),
            "distilbert": lambda: DistilBertForSequenceClassification(DistilBertConfig(
                vocab_size=60, dim=32, n_layers=2, n_heads=2, hidden_dim=64, num_labels=3))}


@pytest.mark.parametrize("architecture, config, per_layer", [
    ("bert", "houlsby", 2), ("bert", "pfeiffer", 1), ("modernbert", "houlsby", 2), ("modernbert", "pfeiffer", 1),
    ("distilbert", "houlsby", 2)])
def test_adapters_start_as_the_identity_and_then_change_the_logits(architecture, config, per_layer):
    torch.manual_seed(0)
    model = tiny_models()[architecture]().eval()
    inputs = {"input_ids": torch.randint(5, 60, (3, 9)), "attention_mask": torch.ones(3, 9, dtype=torch.long)}
    with torch.no_grad():
        base = model(**inputs).logits
        add_adapter(model, "task", config, reduction_factor=8)
        set_active_adapter(model, "task")
        adapted = model(**inputs).logits
    assert torch.equal(adapted, base)  # bit for bit: the up-projections start at zero
    adapters = [slot["task"] for slot in model.modules() if isinstance(slot, AdapterSlot)]
    assert len(adapters) == 2 * per_layer and all(a.down.out_features == 32 // 8 for a in adapters)
    with torch.no_grad():
        for adapter in adapters:  # the hooks really run the adapters
            adapter.up.weight.normal_()
        assert not torch.allclose(model(**inputs).logits, base)


def test_an_architecture_without_a_known_layout_is_refused():
    from transformers import GPT2Config, GPT2ForSequenceClassification

    model = GPT2ForSequenceClassification(GPT2Config(vocab_size=50, n_embd=32, n_layer=2, n_head=2, num_labels=2))
    with pytest.raises(UsageError, match="cannot place adapters in a gpt2 model"):
        add_adapter(model, "task")


# ------------------------------------------------------------------------------------------------ training
def task_b_files(sentiment, directory) -> dict:
    """Task B: the same sentences, three other labels (by sentence length: the training set's tertiles)."""
    with open(sentiment["train"]) as handle:
        lengths = sorted(len(json.loads(line)["sentence"].split()) for line in handle)
    cuts = lengths[len(lengths) // 3], lengths[2 * len(lengths) // 3]
    files = {}
    for split in ("train", "validation"):
        with open(sentiment[split]) as handle:
            rows = [json.loads(line) for line in handle]
        files[split] = str(directory / f"b-{split}.jsonl")
        with open(files[split], "w") as handle:
            for row in rows:
                label = TASK_B_LABELS[sum(len(row["sentence"].split()) >= cut for cut in cuts)]
                handle.write(json.dumps({"sentence": row["sentence"], "label": label}) + "\n")
    return files


@pytest.fixture(scope="module")
def two_tasks(sentiment, mlm_checkpoint, tmp_path_factory) -> dict:
    """Adapter A (Houlsby, sentiment; checkpoints at steps 2 and 4, the best one's adapter kept) on the MLM
    checkpoint, then adapter B (Pfeiffer, three length labels) added to A's output directory."""
    root = tmp_path_factory.mktemp("adapters")
    a, b = root / "a", root / "b"
    main(classify_args(sentiment, a, "--model_name_or_path", mlm_checkpoint, *STEPS, "--finetune_strategy", "adapter",
                       "--adapter_reduction_factor", "8", "--adapter_name", "sentiment", "--save_steps", "2",
                       "--load_best_model_at_end", "--do_predict", "--test_file", sentiment["validation"]))
    frozen_a = {name: tensor.clone() for name, tensor in load_file(os.path.join(a, ADAPTER_WEIGHTS_FILE)).items()}
    b_data = task_b_files(sentiment, root)
    main(classify_args(b_data, b, "--model_name_or_path", str(a), *STEPS, "--strategy", "adapter",
                       "--adapter_config", "pfeiffer", "--adapter_name", "length"))
    return {"a": a, "b": b, "a_weights": frozen_a, "b_data": b_data}


def test_only_the_adapter_and_head_train_and_only_they_are_saved(two_tasks, mlm_checkpoint):
    a = two_tasks["a"]
    assert not os.path.exists(a / "model.safetensors") and not os.path.exists(a / "config.json")
    saved = manifest(a)
    assert saved["base_model"] == os.path.abspath(mlm_checkpoint) and saved["base_config"]["model_type"] == "bert"
    # The encoder the run ended with is the MLM checkpoint's, bit for bit (hashed from the engine's final weights).
    assert saved["base_parameters_sha256"] == base_parameters_sha256(mlm_checkpoint)
    assert saved["adapters"] == {"sentiment": {"config": "houlsby", "reduction_factor": 8, "bottleneck_size": 4,
                                               "id2label": {"0": "negative", "1": "positive"}}}
    weights = two_tasks["a_weights"]
    layers = [f"bert.encoder.layer.{i}.{site}.bottleneck_adapters.sentiment.{part}" for i in range(2)
              for site in ("attention.output", "output") for part in ("down.weight", "down.bias", "up.weight",
                                                                       "up.bias")]
    head = [f"{module}.{part}" for module in ("bert.pooler.sentiment.dense", "classifier.sentiment")
            for part in ("weight", "bias")]
    assert sorted(weights) == sorted(layers + head)
    assert all(torch.count_nonzero(weights[name]) > 0 for name in layers if ".up." in name)  # trained from zero


def test_the_saved_adapter_loads_into_a_pipeline_that_reproduces_the_predictions(two_tasks, sentiment):
    from transformers import AutoTokenizer, pipeline

    a = two_tasks["a"]
    classifier = pipeline("text-classification", model=load_adapter_model(str(a)),
                          tokenizer=AutoTokenizer.from_pretrained(a), top_k=None)
    with open(sentiment["validation"]) as handle:
        texts = [json.loads(line)["sentence"] for line in handle][:6]
    for scores, written in zip(classifier(texts), read_predictions(a)[:6]):
        assert {s["label"]: s["score"] for s in scores} == pytest.approx(written["probabilities"], abs=1e-5)


def test_the_adapters_and_their_base_load_in_the_dtype_that_torch_dtype_names(two_tasks):
    """Loaded (as trainer.classify does, models.loading.pretrained_model) in float32, fingerprint-checked, then
    cast: the float32 model rounded to bfloat16, bit for bit."""
    from trainer.finetune.adapters import load_base_with_adapters

    as_saved = load_base_with_adapters(str(two_tasks["b"]))
    rounded = load_base_with_adapters(str(two_tasks["b"]), dtype=torch.bfloat16)
    assert {p.dtype for p in as_saved.parameters()} == {torch.float32}
    assert {p.dtype for p in rounded.parameters()} == {torch.bfloat16}
    expected = as_saved.state_dict()
    assert all(torch.equal(tensor, expected[name].to(torch.bfloat16)) for name, tensor in rounded.state_dict().items())


def test_a_second_task_leaves_the_first_bit_identical_and_both_load_by_name(two_tasks):
    from transformers import AutoTokenizer

    a, b = two_tasks["a"], two_tasks["b"]
    saved = manifest(b)
    assert list(saved["adapters"]) == ["sentiment", "length"] and saved["active_adapter"] == "length"
    assert saved["base_model"] == manifest(a)["base_model"]
    assert saved["base_parameters_sha256"] == manifest(a)["base_parameters_sha256"]  # the encoder never moved
    weights = load_file(os.path.join(b, ADAPTER_WEIGHTS_FILE))
    assert all(torch.equal(weights[name], tensor) for name, tensor in two_tasks["a_weights"].items())
    assert any(".length.up." in name for name in weights) and not any(  # Pfeiffer: feed-forward outputs only
        "attention.output.bottleneck_adapters.length" in name for name in weights)
    tokenizer = AutoTokenizer.from_pretrained(b)
    inputs = tokenizer(["a slow , dull film .", "one of the best films of the year , truly moving ."],
                       padding=True, return_tensors="pt")
    with torch.no_grad():
        before = load_adapter_model(str(a))(**inputs).logits
        model = load_adapter_model(str(b), "sentiment")
        assert torch.equal(model(**inputs).logits, before)  # task A after task B: what it was before B
        set_active_adapter(model, "length")
        assert model.config.id2label == dict(enumerate(sorted(TASK_B_LABELS)))
        length_logits = model(**inputs).logits
        assert length_logits.shape == (2, 3)
        set_active_adapter(model, "sentiment")
        assert torch.equal(model(**inputs).logits, before) and model.config.id2label == {0: "negative",
                                                                                          1: "positive"}
        torch.testing.assert_close(load_adapter_model(str(b))(**inputs).logits, length_logits, rtol=0, atol=0)


def test_a_checkpoint_resumes_to_the_same_adapter_bit_for_bit(two_tasks, sentiment, mlm_checkpoint, tmp_path):
    a, resumed = two_tasks["a"], tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(a / "checkpoint-2", resumed / "checkpoint-2")
    main(classify_args(sentiment, resumed, "--model_name_or_path", mlm_checkpoint, *STEPS, "--finetune_strategy",
                       "adapter", "--adapter_reduction_factor", "8", "--adapter_name", "sentiment", "--save_steps",
                       "2", "--load_best_model_at_end"))
    expected, got = two_tasks["a_weights"], load_file(os.path.join(resumed, ADAPTER_WEIGHTS_FILE))
    assert got.keys() == expected.keys() and all(torch.equal(got[name], expected[name]) for name in expected)
    assert not os.path.exists(a / "checkpoint-2" / "model.safetensors")  # checkpoints hold the adapters only too


def test_a_changed_base_model_is_refused(two_tasks, mlm_checkpoint, tmp_path):
    from transformers import BertForMaskedLM

    base = tmp_path / "base"
    shutil.copytree(mlm_checkpoint, base)
    adapters = tmp_path / "adapters"
    shutil.copytree(two_tasks["a"], adapters, ignore=shutil.ignore_patterns("checkpoint-*", "runs"))
    saved = manifest(adapters)
    saved["base_model"] = str(base)
    (adapters / ADAPTER_MANIFEST_FILE).write_text(json.dumps(saved))
    assert load_adapter_model(str(adapters)) is not None  # the same weights elsewhere: fine
    model = BertForMaskedLM.from_pretrained(base)
    with torch.no_grad():
        model.bert.encoder.layer[0].output.dense.bias[0] += 1e-3
    model.save_pretrained(base)
    with pytest.raises(UsageError, match="is not the one the adapters .* were trained on"):
        load_adapter_model(str(adapters))


# ----------------------------------------------------------------------------------------------- bad input
def corrupted_copy(two_tasks, directory, name: str, content: bytes) -> str:
    shutil.copytree(two_tasks["a"], directory, ignore=shutil.ignore_patterns("checkpoint-*", "runs"))
    (directory / name).write_bytes(content)
    return str(directory)


def bad_adapter_inputs(two_tasks, mlm_checkpoint, tokenizer_dir, directory) -> dict:
    adapter = ["--model_name_or_path", mlm_checkpoint, "--finetune_strategy", "adapter"]
    return {
        "corrupt manifest": (["--model_name_or_path",
                              corrupted_copy(two_tasks, directory / "m", ADAPTER_MANIFEST_FILE, b"{"),
                              "--finetune_strategy", "adapter", "--adapter_name", "new"],
                             f"{ADAPTER_MANIFEST_FILE} is unreadable"),
        "truncated weights": (["--model_name_or_path", corrupted_copy(two_tasks, directory / "w", ADAPTER_WEIGHTS_FILE,
                                                                      b"\x10\x00"), "--finetune_strategy", "adapter",
                               "--adapter_name", "new"], f"{ADAPTER_WEIGHTS_FILE} cannot be read"),
        "reduction factor zero": ([*adapter, "--adapter_reduction_factor", "0"],
                                  "--adapter_reduction_factor must be positive"),
        "reduction factor above the width": ([*adapter, "--adapter_reduction_factor", "64"],
                                             "must be an integer from 1 to the model's hidden size 32"),
        "unknown config": ([*adapter, "--adapter_config", "lora"], "--adapter_config: invalid choice"),
        "bad name": ([*adapter, "--adapter_name", "task.a"], "--adapter_name 'task.a': an adapter name is"),
        "reserved name": ([*adapter, "--adapter_name", "keys"], "not a reserved word"),
        "name clash": (["--model_name_or_path", str(two_tasks["a"]), "--finetune_strategy", "adapter",
                        "--adapter_name", "sentiment"], "already holds an adapter of that name (sentiment)"),
        "merge": ([*adapter, "--merge_adapters"], "--merge_adapters does not apply to --finetune_strategy adapter"),
        "from scratch": (["--finetune_strategy", "adapter", "--tokenizer_name", tokenizer_dir],
                         "--finetune_strategy adapter trains adapters on a pretrained model"),
        "adapters under another strategy": (["--model_name_or_path", str(two_tasks["a"]), "--finetune_strategy",
                                             "full"], "holds bottleneck adapters, not a whole model"),
    }


@pytest.mark.parametrize("case", ["corrupt manifest", "truncated weights", "reduction factor zero", "reduction factor above the width", "unknown config",
                                  "bad name", "reserved name", "name clash", "merge", "from scratch",
                                  "adapters under another strategy"])
def test_bad_adapter_input_is_one_line_exit_2_and_writes_nothing(case, two_tasks, sentiment, mlm_checkpoint,
                                                                 tokenizer_dir, tmp_path, capsys):
    argv, expected = bad_adapter_inputs(two_tasks, mlm_checkpoint, tokenizer_dir, tmp_path)[case]
    out = tmp_path / "out"
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(classify_args(sentiment, out, "--max_steps", "2", *argv))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and expected in errors[0], err
    assert not out.exists()
