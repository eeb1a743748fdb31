"""trainer.prepare: tokenize a corpus once, into a directory every later run opens at once.

    python -m trainer.prepare --job mlm --train_file corpus.txt --tokenizer_name bert-base-uncased \\
        --max_seq_length 128 --output_dir corpus-prepared
    torchrun --nproc_per_node=8 -m trainer.prepare --job clm --train_file corpus.jsonl --tokenizer_name gpt2 \\
        --block_size 1024 --output_dir corpus-prepared
    python -m trainer.mlm --train_file corpus-prepared --max_seq_length 128 ...    # no tokenization at start-up
    python -m trainer.prepare --job classify --train_file train.csv --validation_file dev.csv \\
        --tokenizer_name bert-base-uncased --max_seq_length 128 --output_dir reviews-prepared

It takes the data, tokenizer and sequence options of the job it prepares for (the same flags), and makes the
sequences with the job's own code (the job's `Tokenization`, trainer/data/tokenization.py): the directory holds
exactly the sequences the job would make from the same flags, and trains to the same parameters.

Under torchrun each of N processes tokenizes a contiguous 1/N of the rows of every split, then (a job that
concatenates: mlm, clm) cuts a contiguous run of whole CHUNK_ROWS-row batches of all the token rows into blocks: the
blocks (classify: the rows) are those of one process (and of the job), whatever N; process i writes shard i.
Process 0 writes the tokenizer and the manifest last, into DIR.tmp, which then takes the name DIR: a crash leaves no
half-written DIR (trainer/data/prepared.py describes it).
"""
from __future__ import annotations

import datetime
import os
import shutil
import sys
import time
from dataclasses import dataclass
from typing import Optional

from trainer.classify import CLASSIFY_JOB
from trainer.clm import CLM_JOB
from trainer.config.job_config import parse_job_config
from trainer.config.parsing import CONFIG_EXTENSIONS, arg, config_file_as_argv, job_parser
from trainer.data.arguments import DataFiles
from trainer.data.loading import CHUNK_ROWS, group_into_blocks
from trainer.data.prepared import (MANIFEST_FORMAT, SPLITS, is_prepared_directory, shard_entry, tokenizer_sha256,
                                   write_manifest)
from trainer.distributed.collectives import all_gather_objects, all_ranks_together, end_processes, main_process_first
from trainer.distributed.launch import start_host_processes
from trainer.engine.jobs import check_output_path
from trainer.errors import exits_cleanly_on_usage_error, require
from trainer.layout import PREPARED_ROWS_DIR, REPLACED_SUFFIX, TEMPORARY_SUFFIX, prepared_shard_dir
from trainer.mlm import MLM_JOB
from trainer.models.loading import check_sequence_length, load_model_config
from trainer.tracking.console import logger, setup_logging

JOBS = {"mlm": MLM_JOB, "clm": CLM_JOB, "classify": CLASSIFY_JOB}
# Processes wait in barriers for the slowest one's shard; tokenizing a large corpus takes hours.
BARRIER_TIMEOUT = datetime.timedelta(hours=48)


@dataclass
class PrepareArguments:
    _argument_group_name = "prepare"

    job: Optional[str] = arg(None, "The job the sequences are for (required, on the command line): mlm, clm or "
                                   "classify. Its data, tokenizer and sequence options follow; --job mlm --help "
                                   "lists them.",
                             choices=list(JOBS))
    output_dir: Optional[str] = arg(None, "Directory to write the prepared data to (required); give it to the job "
                                          "as --train_file.")
    overwrite_output_dir: bool = arg(False, "Replace a non-empty --output_dir (once the new data is complete).")

    def __post_init__(self):
        require(self.output_dir is not None, "--output_dir is required: where the prepared data goes")


def requested_job(argv: list[str]) -> str | None:
    """The value of --job on the command line (or in a config file given first): it decides the other sections."""
    if argv and argv[0].endswith(CONFIG_EXTENSIONS):
        argv = config_file_as_argv(argv[0], job_parser((PrepareArguments,), None)) + argv[1:]
    for index, token in enumerate(argv):
        if token == "--job" and index + 1 < len(argv):
            return argv[index + 1]
        if token.startswith("--job="):
            return token.split("=", 1)[1]
    return None


def prepare_sections(job_name: str | None) -> dict:
    """The job's model, data and own sections, then prepare's (last: it names the program in --help)."""
    job = JOBS.get(job_name)
    if job is None:  # no or an unknown --job: prepare's section alone says what is missing
        return {"prepare": PrepareArguments}
    own = job.tokenization.job
    return {"model": job.all_sections["model"], "data": job.sections["data"], own: job.sections[own],
            "prepare": PrepareArguments}


def check_request(config) -> None:
    """What prepare needs besides each section's own checks: text to prepare, and no option that only training
    applies."""
    data = config.data
    require(bool(data.train_file or data.dataset_name), "name the text to prepare with --train_file or "
                                                        "--dataset_name")
    require(not is_prepared_directory(data.train_file), f"--train_file {data.train_file} is already prepared; give "
                                                        f"it to the job")
    for flag in ("max_train_samples", "max_eval_samples"):
        require(getattr(data, flag) is None, f"--{flag} applies when training; prepare all the data and pass "
                                             f"--{flag} to the job")
    output_dir = config.prepare.output_dir
    check_output_path(output_dir)
    require(not (os.path.isdir(output_dir) and os.listdir(output_dir)) or config.prepare.overwrite_output_dir,
            f"--output_dir {output_dir} is not empty; pass --overwrite_output_dir or choose another directory")


@exits_cleanly_on_usage_error
def main(argv: list[str] | None = None) -> dict:
    """Prepare the data; returns the manifest (on every process)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    job_name = requested_job(argv)
    require(job_name is not None or "-h" in argv or "--help" in argv,
            f"--job is required: the job the data is for ({' or '.join(JOBS)}); see python -m trainer.prepare --help")
    config = parse_job_config(prepare_sections(job_name), argv)
    check_request(config)
    state = start_host_processes(BARRIER_TIMEOUT)
    setup_logging(state.is_main_process)  # process 0's progress bars (on a terminal): its share stands for all
    try:
        return prepare(config, JOBS[job_name].tokenization, state)
    finally:
        end_processes()


def prepare(config, tokenization, state) -> dict:
    started = time.perf_counter()
    files = DataFiles(config.data.train_file, config.data.validation_file)
    with main_process_first(state):  # one process per node loads the text into the datasets cache first
        raw, inputs = tokenization.read_text(config, files)
        tokenizer = tokenization.text_tokenizer(config, raw, inputs)
        model_config = load_model_config(config.model, tokenization.model_preset)
        length = tokenization.sequence_length(config, model_config)
        check_sequence_length(length, model_config, tokenization.length_flag)
    output_dir = config.prepare.output_dir
    scratch = output_dir.rstrip(os.sep) + TEMPORARY_SUFFIX
    rank, world = state.process_index, state.num_processes
    logger.info("preparing %s for trainer.%s in %d process(es): %s %d", ", ".join(f"{len(raw[s])} {s} rows"
                for s in SPLITS), tokenization.job, world, tokenization.length_flag, length)
    with all_ranks_together(rank):
        if state.is_main_process:
            shutil.rmtree(scratch, ignore_errors=True)  # a crashed run's; the name is ours
            os.makedirs(scratch)
    try:
        with all_ranks_together(rank):
            written = write_shards(config, tokenization, raw, inputs, tokenizer, length, scratch, rank, world)
        shards = all_gather_objects(written)
        manifest = make_manifest(config, tokenization, tokenizer, inputs, length, shards)
        with all_ranks_together(rank):
            if state.is_main_process:
                require(manifest["splits"]["train"]["sequences"] > 0,
                        f"the training text is too short for one sequence of {length} tokens; use more text or a "
                        f"smaller {tokenization.length_flag}")
                publish(scratch, output_dir, tokenizer, manifest)
    except BaseException:
        if state.is_main_process:
            shutil.rmtree(scratch, ignore_errors=True)
        raise
    logger.info("prepared %s in %.1fs: %s", ", ".join(f"{manifest['splits'][s]['sequences']} {s} sequences "
                f"({manifest['splits'][s]['tokens']} tokens)" for s in SPLITS), time.perf_counter() - started,
                os.path.abspath(output_dir))
    logger.info("train from it: python -m trainer.%s --train_file %s ...", tokenization.job, output_dir)
    return manifest


def write_shards(config, tokenization, raw, inputs, tokenizer, length: int, scratch: str, rank: int,
                 world: int) -> dict:
    """This process's shard of every split, written; {split: its manifest entry, or None when empty}."""
    import datasets

    part = datasets.DatasetDict({split: raw[split].shard(world, rank, contiguous=True) for split in SPLITS})
    rows = tokenization.tokenize(config, part, inputs, tokenizer)
    if not tokenization.concatenates(config):
        return {split: save_shard(rows[split], scratch, split, rank) for split in SPLITS}
    with all_ranks_together(rank):  # every process's token rows written before any is cut into blocks
        for split in SPLITS:
            rows[split].save_to_disk(os.path.join(scratch, PREPARED_ROWS_DIR, split, str(rank)))
    written = {}
    for split in SPLITS:
        every_row = all_token_rows(scratch, split, world)
        start, end = block_rows(len(every_row), rank, world)
        own = datasets.DatasetDict({split: every_row.select(range(start, end))})
        written[split] = save_shard(group_into_blocks(own, length, config.data)[split], scratch, split, rank)
    return written


def all_token_rows(scratch: str, split: str, world: int):
    """Every process's token rows of `split`, in order, as one memory-mapped Dataset."""
    import datasets

    parts = [datasets.load_from_disk(os.path.join(scratch, PREPARED_ROWS_DIR, split, str(r))) for r in range(world)]
    parts = [part for part in parts if len(part)] or parts[:1]  # an empty part may lack the columns' types
    return parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)


def block_rows(total: int, rank: int, world: int) -> tuple[int, int]:
    """The token rows [start, end) process `rank` cuts into blocks: a contiguous run of whole CHUNK_ROWS-row
    batches (counted from the split's first row, as `group_into_blocks` counts them), 1/world of them."""
    batches = -(-total // CHUNK_ROWS)
    first, last = batches * rank // world, batches * (rank + 1) // world
    return first * CHUNK_ROWS, min(total, last * CHUNK_ROWS)


def save_shard(dataset, scratch: str, split: str, rank: int) -> dict | None:
    """`dataset` saved as shard `rank` of `split`; its manifest entry (None for no sequences: nothing written)."""
    import datasets

    if len(dataset) == 0:
        return None
    path = os.path.join(scratch, prepared_shard_dir(split, rank))
    dataset.save_to_disk(path)
    return shard_entry(split, rank, datasets.load_from_disk(path))


def make_manifest(config, tokenization, tokenizer, inputs, length: int, shards: list[dict]) -> dict:
    """The manifest (trainer/data/prepared.py), from every process's shard entries in process order."""
    splits = {}
    for split in SPLITS:
        entries = [written[split] for written in shards if written[split] is not None]
        splits[split] = {"shards": entries, "sequences": sum(e["sequences"] for e in entries),
                         "tokens": sum(e["tokens"] for e in entries)}
    data = config.data
    return {"format": MANIFEST_FORMAT, "job": tokenization.job, "tokenizer_sha256": tokenizer_sha256(tokenizer),
            "sequence_length": length, "length_flag": tokenization.length_flag,
            "token_options": tokenization.token_options(config), **tokenization.manifest_inputs(inputs),
            # Where the text came from; without a validation split of its own, the job's hold-out made one.
            "source": {name: getattr(data, name) for name in ("train_file", "validation_file", "dataset_name",
                                                              "dataset_config_name", "validation_split_percentage")},
            "processes": len(shards), "splits": splits}


def publish(scratch: str, output_dir: str, tokenizer, manifest: dict) -> None:
    """Process 0: the tokenizer and the manifest (last) into the scratch directory, which becomes `output_dir`."""
    shutil.rmtree(os.path.join(scratch, PREPARED_ROWS_DIR), ignore_errors=True)
    tokenizer.save_pretrained(scratch)
    write_manifest(scratch, manifest)
    if os.path.isdir(output_dir) and os.listdir(output_dir):  # --overwrite_output_dir: the old data goes last
        replaced = output_dir.rstrip(os.sep) + REPLACED_SUFFIX
        os.replace(output_dir, replaced)
        os.replace(scratch, output_dir)
        shutil.rmtree(replaced)
    else:
        os.replace(scratch, output_dir)  # over an empty directory too


if __name__ == "__main__":
    main()
