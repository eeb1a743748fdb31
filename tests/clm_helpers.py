"""Fixtures for the causal-LM tests: a byte-level BPE tokenizer on the test corpus and a tiny GPT-2 to start from.

Imported by the test_clm_*.py modules (pytest picks up fixtures imported into a test module).
"""
from __future__ import annotations

import pytest

from conftest import corpus  # noqa: F401 (fixture)

# A tiny GPT-2 without dropout: runs in seconds, and is deterministic across world sizes.
TINY_GPT2 = dict(n_embd=32, n_layer=2, n_head=2, n_positions=64, resid_pdrop=0.0, embd_pdrop=0.0,
                 attn_pdrop=0.0)
TINY_GPT2_FLAGS = ["--model_type", "gpt2", "--config_overrides", ",".join(f"{k}={v}" for k, v in TINY_GPT2.items())]


@pytest.fixture(scope="session")
def bpe_tokenizer_dir(tmp_path_factory, corpus) -> str:  # noqa: F811
    from trainer.data.demo import train_byte_level_bpe_tokenizer

    directory = str(tmp_path_factory.mktemp("bpe-tokenizer"))
    train_byte_level_bpe_tokenizer([corpus["train"]], vocab_size=500, output_dir=directory)
    return directory


def tiny_gpt2(vocab_size: int, seed: int = 0, **overrides):
    from transformers import GPT2Config, GPT2LMHeadModel

    import torch

    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=vocab_size, bos_token_id=0, eos_token_id=0, **{**TINY_GPT2, **overrides})
    return GPT2LMHeadModel(config).eval()


@pytest.fixture(scope="session")
def gpt2_checkpoint(tmp_path_factory, bpe_tokenizer_dir) -> str:
    """Stands for a pretrained causal LM: a tiny random GPT-2 saved with the tests' BPE tokenizer."""
    from transformers import AutoTokenizer

    directory = tmp_path_factory.mktemp("gpt2-checkpoint")
    tokenizer = AutoTokenizer.from_pretrained(bpe_tokenizer_dir)
    tiny_gpt2(len(tokenizer)).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return str(directory)


def clm_args(corpus, tokenizer_dir, output_dir, *extra) -> list[str]:  # noqa: F811
    """A small, fast trainer.clm command line on the test corpus, training a tiny GPT-2 from scratch."""
    return ["--train_file", corpus["train"], "--validation_file", corpus["validation"],
            "--tokenizer_name", tokenizer_dir, *TINY_GPT2_FLAGS, "--block_size", "32",
            "--output_dir", str(output_dir), "--learning_rate", "5e-3", "--logging_steps", "1",
            "--report_to", "none", "--probe_prompts", "", *extra]


__all__ = ["TINY_GPT2", "TINY_GPT2_FLAGS", "bpe_tokenizer_dir", "gpt2_checkpoint", "tiny_gpt2", "clm_args", "corpus"]
