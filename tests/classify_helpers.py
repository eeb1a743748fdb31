"""Fixtures for the classification tests: small sentiment data and tiny local models to start from.

Imported by test_classify.py and test_finetune.py (pytest picks up fixtures imported into a test module).
"""
from __future__ import annotations

import json
import os

import pytest

from conftest import REPO_ROOT, cut_splits

TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0, max_position_embeddings=128)


@pytest.fixture(scope="session")
def sentiment(tmp_path_factory) -> dict:
    """400 train / 100 validation sentences of the embedded sentiment data (jsonl: sentence, label strings)."""
    from trainer.data.demo import write_sentiment_dataset

    directory = tmp_path_factory.mktemp("sentiment")
    return cut_splits(write_sentiment_dataset(str(directory / "full")), directory, ".jsonl", 400, 100)


def save_tiny(directory, model_class, config_class, tokenizer_dir, **config):
    """A tiny randomly initialised model, saved with the tests' tokenizer like a trainer.mlm output."""
    import torch
    from transformers import AutoTokenizer

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    model = model_class(config_class(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, **config))
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return str(directory)


@pytest.fixture(scope="session")
def mlm_checkpoint(tmp_path_factory, tokenizer_dir) -> str:
    """Stands for a trainer.mlm output: BertForMaskedLM weights (no pooler, an MLM head) + tokenizer."""
    from transformers import BertConfig, BertForMaskedLM

    return save_tiny(tmp_path_factory.mktemp("mlm-checkpoint"), BertForMaskedLM, BertConfig, tokenizer_dir, **TINY)


def classify_args(sentiment, output_dir, *extra) -> list[str]:
    return ["--train_file", sentiment["train"], "--validation_file", sentiment["validation"],
            "--output_dir", str(output_dir), "--max_seq_length", "64", "--per_device_train_batch_size", "8",
            "--per_device_eval_batch_size", "16", "--learning_rate", "1e-3", "--logging_steps", "1",
            "--report_to", "none", *extra]


def read_predictions(output_dir) -> list[dict]:
    with open(os.path.join(output_dir, "predictions.jsonl")) as handle:
        return [json.loads(line) for line in handle]


def base_parameters_sha256(mlm_checkpoint) -> str:
    """The fingerprint of the MLM checkpoint's encoder, computed here from its file (as trainer.finetune.adapters does:
    names and bytes, sorted by name)."""
    import hashlib

    import torch

    from conftest import load_parameters

    digest = hashlib.sha256()
    for name, tensor in sorted(load_parameters(mlm_checkpoint).items()):
        if name.startswith("bert."):
            digest.update(name.encode())
            digest.update(tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def adapter_manifest(directory) -> dict:
    from trainer.layout import ADAPTER_MANIFEST_FILE

    with open(os.path.join(directory, ADAPTER_MANIFEST_FILE)) as handle:
        return json.load(handle)


__all__ = ["REPO_ROOT", "TINY", "sentiment", "mlm_checkpoint", "save_tiny", "classify_args", "read_predictions",
           "base_parameters_sha256", "adapter_manifest"]
