"""Loading raw text data (local files or a Hub dataset) and feeding batches to the engine."""
from __future__ import annotations

import math
import os

import numpy as np
import torch

from trainer.arguments import DATA_FILE_EXTENSIONS
from trainer.errors import UsageError, require
from trainer.hub import check_loadable


def load_raw_splits(data_args, columns_needed=None, keep_linebreaks: bool = False):
    """A DatasetDict with 'train' and 'validation', validation split off the training data when not given.

    `keep_linebreaks`: .txt lines keep their trailing newline (run_clm's --keep_linebreaks)."""
    import datasets

    if data_args.dataset_name:
        check_loadable(data_args.dataset_name, "dataset", "--dataset_name", cached_file="README.md",
                       repo_type="dataset")
        raw = datasets.load_dataset(data_args.dataset_name, data_args.dataset_config_name)
        require("train" in raw, f"--dataset_name {data_args.dataset_name} has no 'train' split")
    else:
        files = {"train": data_args.train_file}
        if data_args.validation_file:
            files["validation"] = data_args.validation_file
        raw = datasets.DatasetDict({split: load_file(path, flag=f"{split}_file", keep_linebreaks=keep_linebreaks)
                                    for split, path in files.items()})
    if "validation" not in raw:
        held_out = raw["train"].train_test_split(test_size=data_args.validation_split_percentage / 100, seed=0)
        raw = datasets.DatasetDict({"train": held_out["train"], "validation": held_out["test"]})
    return datasets.DatasetDict({"train": raw["train"], "validation": raw["validation"]})


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


def group_into_blocks(tokenized, length: int, data_args):
    """Every split of `tokenized` (a DatasetDict) concatenated and cut into blocks of `length` tokens."""
    return tokenized.map(chunk_into_blocks, batched=True, batch_size=1000, fn_kwargs={"length": length},
                         num_proc=data_args.preprocessing_num_workers, desc=f"chunk into blocks of {length}",
                         load_from_cache_file=not data_args.overwrite_cache)


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


class ColumnarBatches(torch.utils.data.Dataset):
    """A datasets.Dataset that hands the collator whole columns for a list of indices, plus the sample ids.

    torch's DataLoader passes a batch sampler's index list to `__getitems__` in one call, so a batch costs one
    Arrow read instead of one per sample. The sample ids let the collator draw each sample's masking from its
    own seeded generator, which keeps the masks independent of world size, batch split and worker count.
    """

    def __init__(self, dataset, columns: list[str]):
        self.dataset = dataset.with_format("numpy", columns=columns)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitems__(self, indices: list[int]) -> dict:
        batch = dict(self.dataset[indices])
        batch["sample_id"] = np.asarray(indices, dtype=np.int64)
        return batch

    def __getitem__(self, index: int) -> dict:
        return self.__getitems__([index])


def make_loader(dataset, columns, batch_sampler, collate_fn, num_workers: int, pin_memory: bool):
    # A private generator: otherwise every new iterator draws its worker base seed from the global torch RNG,
    # and a run resumed mid-epoch (one extra iterator) would continue with other dropout draws than an
    # uninterrupted one. Worker seeds do not matter here: the collators draw from per-sample generators.
    return torch.utils.data.DataLoader(
        ColumnarBatches(dataset, columns), batch_sampler=batch_sampler, collate_fn=collate_fn,
        num_workers=num_workers, pin_memory=pin_memory, persistent_workers=False,
        prefetch_factor=4 if num_workers else None, generator=torch.Generator(),
    )
