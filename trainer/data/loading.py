"""Loading raw data (local files, a Hub dataset, the other training sources of a mixture) and shaping it for the jobs
(blocks, padding)."""
from __future__ import annotations

import math
import os

import numpy as np

from trainer.data.arguments import DATA_FILE_EXTENSIONS, DataFiles, SourceFiles
from trainer.errors import UsageError, require
from trainer.hub.reachability import check_loadable


def load_raw_splits(data_args, files: DataFiles, keep_linebreaks: bool = False):
    """A DatasetDict with 'train' and 'validation' (from `files`, or --dataset_name), validation split off the
    training data when not given.

    `keep_linebreaks`: .txt lines keep their trailing newline (run_clm's --keep_linebreaks)."""
    import datasets

    if data_args.dataset_name:
        check_loadable(data_args.dataset_name, "dataset", "--dataset_name", cached_file="README.md",
                       repo_type="dataset")
        raw = datasets.load_dataset(data_args.dataset_name, data_args.dataset_config_name)
        require("train" in raw, f"--dataset_name {data_args.dataset_name} has no 'train' split")
    else:
        raw = datasets.DatasetDict({"train": load_source(files.primary_source(), keep_linebreaks)})
        if files.validation:
            raw["validation"] = load_file(files.validation, flag="validation_file", keep_linebreaks=keep_linebreaks)
    if "validation" not in raw:
        held_out = hold_out(raw["train"], data_args, files)
        raw = datasets.DatasetDict({"train": held_out["train"], "validation": held_out["test"]})
    return datasets.DatasetDict({"train": raw["train"], "validation": raw["validation"]})


def hold_out(dataset, data_args, files: DataFiles):
    """--validation_split_percentage of the rows for evaluation; too few rows for both parts is a usage error."""
    percent = data_args.validation_split_percentage
    try:
        return dataset.train_test_split(test_size=percent / 100, seed=0)
    except ValueError:  # datasets: "With n_samples=1, test_size=0.05 ... the resulting train set will be empty"
        raise UsageError(f"{data_source(data_args, files, 'train')} has {len(dataset)} row(s), too few to hold out "
                         f"{percent}% for evaluation; give --validation_file or more data") from None


def load_source(source: SourceFiles, keep_linebreaks: bool = False):
    """A training source's files as one Dataset, in their (sorted) order."""
    import datasets

    parts = [load_file(path, source.flag, keep_linebreaks) for path in source.files]
    try:
        return parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)
    except ValueError:  # datasets: "The features can't be aligned because the key ... of features ..."
        raise UsageError(f"{source}: its files differ in their columns or types ({', '.join(source.files[:3])}"
                         f"{', ...' if len(source.files) > 3 else ''}); give files of one layout per source") from None


def load_file(path: str, flag: str, keep_linebreaks: bool = False):
    """One local file as a Dataset; unreadable content is a UsageError naming the file."""
    import datasets

    builder = DATA_FILE_EXTENSIONS[os.path.splitext(path)[1].lower()]
    options = {"keep_linebreaks": True} if builder == "text" and keep_linebreaks else {}
    # datasets logs its own error lines and a progress bar to stderr; our one-line error says it all.
    verbosity, bars = datasets.logging.get_verbosity(), datasets.is_progress_bar_enabled()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL + 1)
    datasets.disable_progress_bars()
    try:
        return datasets.load_dataset(builder, data_files={"data": os.path.abspath(path)}, split="data", **options)
    except Exception as error:  # datasets raises many types for malformed or non-UTF-8 files
        cause = error.__cause__ or error
        raise UsageError(f"--{flag} {path} could not be read as {builder}: "
                         f"{type(cause).__name__}: {str(cause).splitlines()[0] if str(cause) else ''}") from None
    finally:
        datasets.logging.set_verbosity(verbosity)
        if bars:
            datasets.enable_progress_bars()


def resolve_text_column(dataset, requested: str | None, flag: str = "--text_column") -> str:
    columns = dataset.column_names
    if requested is not None:
        require(requested in columns, f"{flag} '{requested}' not in the data; columns are: {', '.join(columns)}")
        return requested
    if "text" in columns:
        return "text"
    string_columns = [name for name, feature in dataset.features.items()
                      if getattr(feature, "dtype", None) in ("string", "large_string")]
    require(bool(string_columns), f"no text column in the data (columns: {', '.join(columns)}); "
                                  f"name one with {flag}")
    return string_columns[0]


def load_text_splits(data_args, files: DataFiles, keep_linebreaks: bool = False):
    """(train/validation DatasetDict, the text column): the column checked to hold text in every split. The training
    sources after the primary (--train_files' others, --replay_file) are further splits, "source_1", ..., for the job
    to prepare with the others (see `other_source_splits`)."""
    raw = load_raw_splits(data_args, files, keep_linebreaks=keep_linebreaks)
    text_column = resolve_text_column(raw["train"], data_args.text_column)
    for index, other in enumerate(load_other_sources(files, [text_column], keep_linebreaks), start=1):
        raw[source_split(index)] = other  # prepared with the training split, exactly as it
    for split, dataset in raw.items():
        check_text_column(dataset, text_column, data_source(data_args, files, split))
    # The text alone goes on, so that every split (every source's) has the same columns to drop.
    return raw.select_columns([text_column]), text_column


def source_split(index: int) -> str:
    """The split of training source `index` (1..: after the primary) in a job's DatasetDict."""
    return f"source_{index}"


def other_source_splits(processed, files: DataFiles) -> list:
    """The prepared splits of the training sources after the primary (see `load_text_splits`), in mixture order; a
    source too short for one sequence is a usage error."""
    others = []
    for index, source in enumerate(files.other_sources(), start=1):
        prepared = processed[source_split(index)]
        require(len(prepared) > 0, f"{source} is too short for one training sequence; use more text in it or "
                                   f"shorter sequences")
        others.append(prepared)
    return others


def data_source(data_args, files: DataFiles, split: str) -> str:
    """The flag and name a split comes from, for error messages."""
    if split.startswith("source_"):
        return str(files.other_sources()[int(split.removeprefix("source_")) - 1])
    if data_args.dataset_name:
        return f"--dataset_name {data_args.dataset_name} ({split})"
    if split == "validation" and files.validation:
        return f"--validation_file {files.validation}"
    return str(files.primary_source())


def check_text_column(dataset, column: str, source: str, flag: str = "--text_column") -> None:
    """The column exists and holds strings (nulls allowed): not numbers, lists or objects."""
    require(column in dataset.column_names, f"{source} has no column '{column}' (columns: "
                                            f"{', '.join(dataset.column_names)}); name the text column with {flag}")
    feature = dataset.features[column]
    dtype = getattr(feature, "dtype", None)
    kind = ("object" if isinstance(feature, dict) else dtype if isinstance(dtype, str) and dtype != "null"
            else "only empty (null)" if dtype == "null" else type(feature).__name__.lower())
    require(dtype in ("string", "large_string"), f"column '{column}' of {source} holds {kind} values, not text; "
                                                 f"fix the data or name the text column with {flag}")


def chunk_into_blocks(batch: dict, length: int) -> dict:
    """Concatenate each column and cut it into blocks of `length`, dropping the remainder (run_mlm/run_clm's
    `group_texts`).

    Linear time: one numpy concatenation and one reshape per column (never `sum(list_of_lists, [])`).
    """
    out = {}
    for name, rows in batch.items():
        flat = np.concatenate([np.asarray(row, dtype=np.int32) for row in rows]) if rows else np.zeros(0, np.int32)
        out[name] = flat[:(len(flat) // length) * length].reshape(-1, length)
    return out


CHUNK_ROWS = 1000  # token rows concatenated per cut (run_mlm/run_clm's map batch); each drops its remainder


def group_into_blocks(tokenized, length: int, data_args):
    """Every split of `tokenized` (a DatasetDict) cut into blocks of `length` tokens, batch by batch of CHUNK_ROWS
    consecutive rows counted from the split's start.

    In one process, whatever --preprocessing_num_workers: workers would start a batch at each worker's first row,
    so the blocks would depend on their number. Counted from the start, they do not, and trainer.prepare can cut
    each process's part of the rows (starting at a multiple of CHUNK_ROWS) into exactly these blocks. Cutting is
    a small share of the preparation (numpy concatenation and reshape); tokenizing keeps the workers."""
    return tokenized.map(chunk_into_blocks, batched=True, batch_size=CHUNK_ROWS, fn_kwargs={"length": length},
                         desc=f"chunk into blocks of {length}", load_from_cache_file=not data_args.overwrite_cache)


def first_samples(train_set, eval_set, data_args):
    """The training and evaluation sets cut to --max_train_samples / --max_eval_samples (when given)."""
    if data_args.max_train_samples:
        train_set = train_set.select(range(min(len(train_set), data_args.max_train_samples)))
    if data_args.max_eval_samples:
        eval_set = eval_set.select(range(min(len(eval_set), data_args.max_eval_samples)))
    return train_set, eval_set


def pad_rows(rows, pad_value: int, multiple_of: int = 8) -> np.ndarray:
    """Stack rows of equal length, or pad ragged rows (line by line) to the longest, rounded up to a multiple."""
    if isinstance(rows, np.ndarray) and rows.dtype != object:
        return rows.astype(np.int64)
    longest = max(len(row) for row in rows)
    width = multiple_of * math.ceil(longest / multiple_of)
    out = np.full((len(rows), width), pad_value, dtype=np.int64)
    for i, row in enumerate(rows):
        out[i, :len(row)] = row
    return out


def load_other_sources(files: DataFiles, columns: list[str], keep_linebreaks: bool = False) -> list:
    """The raw training sources after the primary (--train_files' others, then --replay_file), each one Dataset,
    checked to have the training data's `columns` (text, text pair, label: what the job reads of a training row)."""
    others = []
    for source in files.other_sources():
        raw = load_source(source, keep_linebreaks)
        missing = [column for column in columns if column not in raw.column_names]
        require(not missing, f"{source} has no column {', '.join(repr(c) for c in missing)} (its columns: "
                             f"{', '.join(raw.column_names)}); the {source.role} data needs the training "
                             f"data's columns ({', '.join(columns)})")
        require(len(raw) > 0, f"{source} has no rows")
        others.append(raw)
    return others


def cache_file_for(dataset, transform, kind: str) -> str | None:
    """Where `dataset.map(transform)` caches its result: in datasets' own cache, named by the rows' fingerprint and
    the transform (its code and what it closes over, hashed as datasets hashes a map). datasets would write it
    beside the rows' Arrow files, which for a prepared directory (trainer.prepare) is the job's input: shared by
    every run that trains on it, and maybe read-only. None for rows in memory (nothing is cached)."""
    import datasets
    from datasets.fingerprint import Hasher

    if not dataset.cache_files:
        return None
    directory = os.path.join(datasets.config.HF_DATASETS_CACHE, f"trainer-{kind}")
    os.makedirs(directory, exist_ok=True)
    return os.path.join(directory, f"{Hasher.hash([dataset._fingerprint, transform])}.arrow")
