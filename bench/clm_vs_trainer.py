"""Benchmark: trainer.clm against the transformers Trainer on the same causal-LM job.

One fixture (a byte-level BPE tokenizer on the embedded corpus and a randomly initialised GPT-2 saved locally) and
the same blocks feed both: trainer.clm's own tokenization and run_clm-style concatenation into `--seq_len`
blocks. The Trainer gets them as run_clm.py does (labels = input ids, `default_data_collator`, the model shifts);
this engine runs `trainer.clm` on the same files. Same model, batch, block size, steps, optimizer and precision.
Each side runs in its own process, `--repeats` times, alternating which side goes first (bench/harness.py); the
script prints every run, the median tokens/s of each side and the per-pair ratios, peak resident memory, and the
eval loss of both trained models measured the same way: trainer.clm's evaluation on the same validation blocks.

    python bench/clm_vs_trainer.py                    # fp32, the tiny GPT-2 (2 x 128), batch 16 x 256, vocab 8k
    python bench/clm_vs_trainer.py --bf16             # bf16 autocast on both sides
"""
from __future__ import annotations

import os

import harness  # bench/harness.py: also puts the repository first on the path
import torch


def build_fixture(directory: str, opts) -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    from trainer.data.demo import train_byte_level_bpe_tokenizer, write_mlm_corpus

    train, _ = write_mlm_corpus(os.path.join(directory, "corpus"))
    tokenizer = train_byte_level_bpe_tokenizer([train], vocab_size=opts.vocab_size,
                                               output_dir=os.path.join(directory, "model"))
    # A vocabulary of --vocab_size (GPT-2's 50257 on GPU), padded to a multiple of 64: the corpus needs fewer tokens,
    # the other rows cost what they cost in a real model. Dropout as GPT-2's (0.1) on both sides.
    config = GPT2Config(vocab_size=64 * -(-max(opts.vocab_size, len(tokenizer)) // 64), n_embd=opts.hidden, n_layer=opts.layers,
                        n_head=opts.hidden // 64, n_positions=max(opts.seq_len, 256),
                        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    GPT2LMHeadModel(config).save_pretrained(os.path.join(directory, "model"))


def blocks(directory: str, opts):
    """The training and validation blocks, prepared by trainer.clm's own pipeline (shared by both sides)."""
    from types import SimpleNamespace

    from transformers import AutoTokenizer

    from trainer.clm import tokenize_documents
    from trainer.data.arguments import DataFiles
    from trainer.data.loading import group_into_blocks, load_raw_splits

    corpus = os.path.join(directory, "corpus")
    files = DataFiles(os.path.join(corpus, "train.txt"), os.path.join(corpus, "validation.txt"))
    data_args = SimpleNamespace(dataset_name=None, preprocessing_num_workers=None, overwrite_cache=False,
                                validation_split_percentage=5)
    tokenizer = AutoTokenizer.from_pretrained(os.path.join(directory, "model"))
    raw = load_raw_splits(data_args, files, keep_linebreaks=True)
    return tokenizer, group_into_blocks(tokenize_documents(raw, "text", tokenizer, data_args), opts.seq_len,
                                        data_args)


def run_transformers_trainer(directory: str, opts) -> dict:
    from transformers import AutoModelForCausalLM, Trainer, default_data_collator

    tokenizer, data = blocks(directory, opts)
    data = data.map(lambda batch: {"labels": batch["input_ids"]}, batched=True)  # as run_clm.py's group_texts
    model = AutoModelForCausalLM.from_pretrained(os.path.join(directory, "model"))
    trainer = Trainer(model=model, args=harness.transformers_training_arguments(directory, opts),
                      train_dataset=data["train"], data_collator=default_data_collator)
    return harness.train_transformers(trainer, tokenizer, directory, opts)


def job_flags(opts) -> list[str]:
    return ["--block_size", str(opts.seq_len), "--probe_prompts", ""]


if __name__ == "__main__":
    # The shape of trainer.clm's tiny GPT-2 preset, with the output layer (vocabulary 8k) a large part of the work.
    options = harness.parser(__doc__, steps=15, batch_size=16, seq_len=256, layers=2, hidden=128,
                             learning_rate=1e-3).parse_args()
    harness.main(__file__, f"CLM, GPT-2 {options.layers}x{options.hidden}", options, build_fixture, blocks,
                 run_transformers_trainer, "trainer.clm", job_flags)
