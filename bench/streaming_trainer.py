"""The transformers `Trainer`'s side of bench/streaming.py: what `run_mlm.py --streaming` does, written here.

A directory of .txt shards is streamed by `datasets.load_dataset("text", streaming=True)`, its documents shuffled in a
seeded buffer (the files' order too), tokenized and grouped into blocks by `.map` (run_mlm's `group_texts`), masked by
`DataCollatorForLanguageModeling`, and trained for --max_steps by the `Trainer`: the BERT, batch and sequence length
of bench/streaming.py's job. As run_mlm does, a run resumes from the last checkpoint in its output directory; the
`Trainer` then replays the consumed batches through the stream (tokenized and collated) and discards them.

One line per optimizer step, `optimizer step N done`, flushed as the step ends: bench/streaming.py times them.

    python bench/streaming_trainer.py --train_dir DIR --tokenizer DIR --output_dir DIR --max_steps 2
"""
from __future__ import annotations

import argparse
import glob
import os

import torch
from transformers import (AutoTokenizer, BertConfig, BertForMaskedLM, DataCollatorForLanguageModeling, Trainer,
                          TrainerCallback, TrainingArguments)
from transformers.trainer_utils import get_last_checkpoint

from preprocess import chain_chunk  # run_mlm's group_texts, blocks of preprocess.BLOCK tokens
from streaming import BATCH, BERT, SHUFFLE_BUFFER

STEP_LINE = r"optimizer step (\d+) done"


class StepLines(TrainerCallback):
    """Prints STEP_LINE at the end of every optimizer step (after a resume's skip, the first is step N+1)."""

    def on_step_end(self, args, state, control, **kwargs):
        print(STEP_LINE.replace(r"(\d+)", str(state.global_step)), flush=True)


def stream(train_dir: str, tokenizer):
    """The training blocks as a datasets IterableDataset: nothing is read before the first batch is asked for."""
    from datasets import load_dataset

    files = sorted(glob.glob(os.path.join(train_dir, "*.txt")))
    raw = load_dataset("text", data_files={"train": files}, split="train", streaming=True)
    # Documents are shuffled, as our side's --shuffle_buffer_size windows shuffle documents, before they become blocks.
    shuffled = raw.shuffle(seed=0, buffer_size=SHUFFLE_BUFFER)
    tokenized = shuffled.map(lambda batch: tokenizer(batch["text"], return_special_tokens_mask=True), batched=True,
                             remove_columns=["text"])
    return tokenized.map(chain_chunk, batched=True)


def new_model(tokenizer) -> BertForMaskedLM:
    """The job's BERT from scratch, its vocabulary padded to a multiple of 64 as trainer.mlm pads it."""
    torch.manual_seed(0)
    config = BertConfig(vocab_size=64 * -(-len(tokenizer) // 64), pad_token_id=tokenizer.pad_token_id, **BERT)
    return BertForMaskedLM(config)


def training_arguments(opts) -> TrainingArguments:
    saving = {"save_strategy": "steps", "save_steps": opts.save_steps} if opts.save_steps else {"save_strategy": "no"}
    return TrainingArguments(
        output_dir=opts.output_dir, per_device_train_batch_size=BATCH, max_steps=opts.max_steps, learning_rate=1e-4,
        use_cpu=True, report_to="none", eval_strategy="no", logging_steps=max(opts.max_steps, 1),
        dataloader_num_workers=0, disable_tqdm=True, seed=0, **saving)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train_dir", required=True)
    parser.add_argument("--tokenizer", required=True)
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--max_steps", type=int, required=True)
    parser.add_argument("--save_steps", type=int, default=0, help="0: no checkpoints")
    opts = parser.parse_args()
    tokenizer = AutoTokenizer.from_pretrained(opts.tokenizer)
    trainer = Trainer(model=new_model(tokenizer), args=training_arguments(opts),
                      train_dataset=stream(opts.train_dir, tokenizer), callbacks=[StepLines()],
                      data_collator=DataCollatorForLanguageModeling(tokenizer, mlm_probability=0.15, seed=0))
    last = get_last_checkpoint(opts.output_dir) if os.path.isdir(opts.output_dir) else None
    trainer.train(resume_from_checkpoint=last)


if __name__ == "__main__":
    main()
