"""trainer.clm's own bad input: one line naming the problem and the fix, exit code 2, nothing written."""
import pytest

from clm_helpers import bpe_tokenizer_dir, clm_args, corpus, gpt2_checkpoint  # noqa: F401 (fixtures)
from conftest import fails_cleanly as shared_fails_cleanly
from trainer.clm import main


def fails_cleanly(argv, capsys) -> str:
    return shared_fails_cleanly(main, argv, capsys)


@pytest.fixture
def job(corpus, bpe_tokenizer_dir, tmp_path, monkeypatch, job_env):  # noqa: F811
    for key in ("TRAINER_CACHE", "HF_DATASETS_CACHE", "HF_HUB_OFFLINE"):
        monkeypatch.setenv(key, job_env[key])
    out = tmp_path / "out"

    def argv(*extra):
        return clm_args(corpus, bpe_tokenizer_dir, out, "--max_steps", "2", *extra)

    yield argv
    assert not out.exists(), "a failed run must not write its output directory"


def test_block_size_beyond_the_model_positions(job, capsys):
    assert "--block_size 128 exceeds the model's 64 positions; use --block_size 64" in fails_cleanly(
        job("--block_size", "128"), capsys)


def test_corpus_shorter_than_one_block(job, tmp_path, capsys):
    short = tmp_path / "short.txt"
    short.write_text("a short film .\n")
    message = fails_cleanly(job("--train_file", str(short), "--validation_file", str(short)), capsys)
    assert "too short for one block of 32 tokens" in message and "--block_size" in message


def test_document_packing_needs_an_eos_token(job, tokenizer_dir, capsys):
    argv = job("--packing", "documents", "--tokenizer_name", tokenizer_dir)  # the WordPiece tokenizer: no EOS
    assert "--packing documents separates documents by the EOS token, and this tokenizer has none" in \
        fails_cleanly(argv, capsys)


def test_adapters_need_a_pretrained_model(job, capsys):
    assert "--finetune_strategy lora trains adapters on a pretrained model" in fails_cleanly(
        job("--finetune_strategy", "lora"), capsys)


def test_prompt_tuning_on_a_model_type_peft_cannot_handle(job, bpe_tokenizer_dir, tmp_path, capsys):  # noqa: F811
    from transformers import AutoTokenizer, MambaConfig, MambaForCausalLM

    mamba = tmp_path / "mamba"
    tokenizer = AutoTokenizer.from_pretrained(bpe_tokenizer_dir)
    MambaForCausalLM(MambaConfig(vocab_size=len(tokenizer), hidden_size=16, num_hidden_layers=1,
                                 state_size=4)).save_pretrained(mamba)
    tokenizer.save_pretrained(mamba)
    argv = [a for a in job("--finetune_strategy", "prompt", "--model_name_or_path", str(mamba))]
    overrides = argv.index("--model_type")
    del argv[overrides:overrides + 4]
    assert "--finetune_strategy prompt is not possible on a mamba model" in fails_cleanly(argv, capsys)


@pytest.mark.parametrize("flag, value, expected", [
    ("--block_size", "1", "--block_size must be at least 2"),
    ("--loss_chunk_tokens", "-1", "--loss_chunk_tokens must be >= 0"),
    ("--merge_adapters", "true", "--merge_adapters only applies to --finetune_strategy lora"),
])
def test_bad_values(flag, value, expected, job, capsys):
    assert expected in fails_cleanly(job(flag, value), capsys)


def test_gradual_unfreezing_refused_under_deepspeed(job, capsys):
    import os

    from conftest import REPO_ROOT

    argv = job("--finetune_strategy", "gradual_unfreeze", "--deepspeed", os.path.join(REPO_ROOT, "ds_configs",
                                                                                        "zero2.json"))
    assert "run it without DeepSpeed" in fails_cleanly(argv, capsys)


def test_bottleneck_adapters_are_for_classification(job, gpt2_checkpoint, capsys):  # noqa: F811
    argv = job("--finetune_strategy", "adapter", "--model_name_or_path", gpt2_checkpoint)
    overrides = argv.index("--model_type")
    del argv[overrides:overrides + 4]
    assert "--finetune_strategy adapter is for trainer.classify" in fails_cleanly(argv, capsys)
