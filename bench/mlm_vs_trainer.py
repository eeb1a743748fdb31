"""Benchmark: trainer.mlm against the transformers Trainer on the same MLM job.

One fixture (a WordPiece tokenizer on the embedded corpus and a randomly initialised BERT saved locally) and the
same tokenized blocks feed both: the transformers `Trainer` with `DataCollatorForLanguageModeling`, and this
package's engine. Same model, batch, sequence length, steps, optimizer and precision. Each side runs in its own
process, `--repeats` times, alternating which side goes first (the machine's speed drifts); the script prints
every run, the median tokens/s of each side and the median of the per-pair ratios, peak resident memory, and the
eval loss of both trained models measured the same way: trainer.mlm's evaluation with its fixed masks.

    python bench/mlm_vs_trainer.py                    # fp32, 4-layer 256-wide BERT, batch 32 x 128
    python bench/mlm_vs_trainer.py --bf16             # bf16 autocast on both sides
    python bench/mlm_vs_trainer.py --torch_compile    # compile this engine's model (compile time included)
"""
from __future__ import annotations

import os

import harness  # bench/harness.py: also puts the repository first on the path
import torch


def build_fixture(directory: str, opts) -> None:
    from transformers import BertConfig, BertForMaskedLM

    from trainer.data.demo import train_wordpiece_tokenizer, write_mlm_corpus

    train, validation = write_mlm_corpus(os.path.join(directory, "corpus"))
    tokenizer = train_wordpiece_tokenizer([train], vocab_size=8000, output_dir=os.path.join(directory, "model"))
    # The vocabulary of the reference job (8k; BERT-base's 30522 on GPU), padded to a multiple of 64. The generated
    # corpus itself needs only ~2k tokens: the other rows exist and cost what they cost in a real model.
    config = BertConfig(vocab_size=64 * -(-max(opts.vocab_size, len(tokenizer)) // 64), hidden_size=opts.hidden,
                        num_hidden_layers=opts.layers, num_attention_heads=opts.hidden // 64,
                        intermediate_size=4 * opts.hidden, max_position_embeddings=512)
    torch.manual_seed(0)
    BertForMaskedLM(config).save_pretrained(os.path.join(directory, "model"))


def blocks(directory: str, opts):
    """The tokenized, chunked training blocks, prepared by trainer.mlm's own pipeline (shared by both sides)."""
    from types import SimpleNamespace

    from transformers import AutoTokenizer

    from trainer.data.arguments import DataFiles
    from trainer.data.loading import load_raw_splits
    from trainer.mlm import MLM_TOKENIZATION, MLMArguments

    corpus = os.path.join(directory, "corpus")
    files = DataFiles(os.path.join(corpus, "train.txt"), os.path.join(corpus, "validation.txt"))
    data_args = SimpleNamespace(dataset_name=None, max_seq_length=opts.seq_len,
                                preprocessing_num_workers=None, overwrite_cache=False, validation_split_percentage=5)
    tokenizer = AutoTokenizer.from_pretrained(os.path.join(directory, "model"))
    raw = load_raw_splits(data_args, files)
    config = SimpleNamespace(data=data_args, mlm=MLMArguments())
    return tokenizer, MLM_TOKENIZATION.sequences(config, raw, "text", tokenizer, opts.seq_len)


def run_transformers_trainer(directory: str, opts) -> dict:
    from transformers import AutoModelForMaskedLM, DataCollatorForLanguageModeling, Trainer

    tokenizer, data = blocks(directory, opts)
    model = AutoModelForMaskedLM.from_pretrained(os.path.join(directory, "model"))
    trainer = Trainer(model=model, args=harness.transformers_training_arguments(directory, opts),
                      train_dataset=data["train"], eval_dataset=data["validation"],
                      data_collator=DataCollatorForLanguageModeling(tokenizer, mlm_probability=0.15, seed=0))
    return harness.train_transformers(trainer, tokenizer, directory, opts)


def job_flags(opts) -> list[str]:
    return ["--max_seq_length", str(opts.seq_len), "--probe_sentences", ""]


if __name__ == "__main__":
    options = harness.parser(__doc__).parse_args()
    harness.main(__file__, f"MLM, BERT {options.layers}x{options.hidden}", options, build_fixture, blocks,
                 run_transformers_trainer, "trainer.mlm", job_flags)
