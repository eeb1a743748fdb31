"""The data section of the command line, and the data files a job reads (`DataFiles`)."""
from __future__ import annotations

import glob
import math
import os
from dataclasses import dataclass
from typing import Optional

from trainer.config.parsing import arg
from trainer.errors import require

DATA_FILE_EXTENSIONS = {".txt": "text", ".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}


@dataclass
class CorpusArguments:
    """Where the text comes from and how much of it is used: what every job shares. How long a sequence is
    belongs to the job: `DataArguments.max_seq_length` (mlm, classify), `ClmArguments.block_size` (clm)."""

    _argument_group_name = "data"

    dataset_name: Optional[str] = arg(None, "Hub dataset name (needs network). Unset with no --train_file: "
                                            "the embedded offline demo corpus.")
    dataset_config_name: Optional[str] = arg(None, "Configuration of --dataset_name.")
    train_file: Optional[str] = arg(None, "Training data: .txt, .json/.jsonl, .csv or .parquet; with --streaming "
                                          "also a directory or a glob of such files (quote it).")
    validation_file: Optional[str] = arg(None, "Evaluation data, same formats. Unset: split off the training data "
                                               "(with --streaming it is needed).")
    text_column: Optional[str] = arg(None, "Column holding the text (default: 'text', or the only/first string "
                                           "column).")
    validation_split_percentage: int = arg(5, "Percent of the training data held out for evaluation when no "
                                              "validation data is given.")
    preprocessing_num_workers: Optional[int] = arg(None, "Processes for tokenization.")
    overwrite_cache: bool = arg(False, "Tokenize again instead of reusing the datasets cache.")
    max_train_samples: Optional[int] = arg(None, "Keep only this many training sequences (debugging).")
    max_eval_samples: Optional[int] = arg(None, "Keep only this many evaluation sequences (debugging). With "
                                                "--streaming: the evaluation set is this many sequences from the "
                                                "start of the validation data (default 512).")
    streaming: bool = arg(False, "Read, tokenize and pack the training data as training goes (nothing up front), in "
                                 "a seeded order that is the same at every world size and resumes at once. Needs "
                                 "--max_steps (the run's length) and --validation_file; the data is read at most "
                                 "--num_train_epochs times (rounded up), a shorter stream stops the run.")
    shuffle_buffer_size: int = arg(1000, "With --streaming: documents per shuffle window of each lane (a resume "
                                         "re-reads at most one window).")

    def __post_init__(self):
        require(not (self.dataset_name and self.train_file), "give either --dataset_name or --train_file, not both")
        for flag in ("train_file", "validation_file"):
            path = getattr(self, flag)
            if path is not None:
                # A stream takes a directory or glob too; its files are checked as it opens them.
                if not self.streaming:
                    check_data_file(path, flag)
        require(self.shuffle_buffer_size > 0, f"--shuffle_buffer_size must be positive, got "
                                              f"{self.shuffle_buffer_size}")
        require(not (self.streaming and self.max_train_samples), "--max_train_samples does not apply to "
                                                                 "--streaming: the run's length is --max_steps")
        require(0 < self.validation_split_percentage < 100, "--validation_split_percentage must be in 1..99")
        for flag in ("preprocessing_num_workers", "max_train_samples", "max_eval_samples"):
            value = getattr(self, flag)
            require(value is None or value > 0, f"--{flag} must be positive, got {value}")


@dataclass
class DataArguments(CorpusArguments):
    max_seq_length: int = arg(128, "Tokens per training sequence (must not exceed the model's positions).")

    def __post_init__(self):
        super().__post_init__()
        require(self.max_seq_length > 0, "--max_seq_length must be positive")


def check_data_file(path: str, flag: str) -> None:
    require(os.path.exists(path) or not os.path.islink(path), f"--{flag} {path} is a broken symbolic link (its "
                                                              f"target is missing, or a symbolic link loop)")
    require(os.path.exists(path), f"--{flag} {path}: no such file")
    require(not os.path.isdir(path), f"--{flag} {path} is a directory; give a file (a directory "
                                                f"or glob of files takes --streaming)")
    extension = os.path.splitext(path)[1].lower()
    require(extension in DATA_FILE_EXTENSIONS,
            f"--{flag} {path}: unsupported extension '{extension}'; use one of {', '.join(DATA_FILE_EXTENSIONS)}")
    require(os.access(path, os.R_OK), f"--{flag} {path} is not readable; check its permissions")
    require(os.path.getsize(path) > 0, f"--{flag} {path} is empty")
    if DATA_FILE_EXTENSIONS[extension] == "text":
        check_holds_text_lines(path, flag)


TEXT_SCAN_CHUNK = 1 << 20
MAX_FIRST_LINE_BYTES = 64 << 20
NOT_TEXT = b"\x00 \t\n\r\x0b\x0c"  # NUL and ASCII whitespace
UTF8_BOM = b"\xef\xbb\xbf"


def check_holds_text_lines(path: str, flag: str) -> None:
    """A .txt corpus holds some character other than NUL, whitespace and BOMs, and its first line ends within
    MAX_FIRST_LINE_BYTES. datasets' text loader reads a whole line into memory before anything else happens, so a
    multi-GB file with no newline (e.g. a sparse file of NULs) would run for minutes in unbounded memory, and a file
    of only blanks fails deep inside tokenization. The scan stops once it has seen a text byte and a newline, so a
    real corpus costs one chunk's read."""
    seen_text = seen_newline = False
    carried, read = b"", 0  # the start of a BOM cut by the chunk's end
    with open(path, "rb") as handle:
        while not (seen_text and seen_newline):
            chunk = handle.read(TEXT_SCAN_CHUNK)
            if not chunk:
                break
            read += len(chunk)
            seen_newline = seen_newline or b"\n" in chunk
            rest = (carried + chunk.translate(None, NOT_TEXT)).replace(UTF8_BOM, b"")
            carried = rest if UTF8_BOM.startswith(rest) else b""
            seen_text = seen_text or not UTF8_BOM.startswith(rest)
            require(seen_newline or read <= MAX_FIRST_LINE_BYTES,
                    f"--{flag} {path}: its first line is longer than {MAX_FIRST_LINE_BYTES >> 20} MiB (no newline); "
                    f"a .txt corpus holds one text per line: split it into lines")
    require(seen_text, f"--{flag} {path} holds no text (only blank lines, NUL bytes or byte-order marks); give a "
                       f"file with text in it")


@dataclass(frozen=True)
class DataFiles:
    """The files a job reads: those named on the command line or, with no data named, the embedded demo's. Derived
    from the arguments (see trainer.engine.jobs.data_files), never written back into them."""

    train: Optional[str]
    validation: Optional[str]
    replay: Optional[str] = None  # --replay_file (trainer.continual)


# ------------------------------------------------------------------- sources: a file, a directory or a glob, weighted
@dataclass(frozen=True)
class WeightedSource:
    """One training source of a mixture: `pattern` (a file, a directory or a glob) and its weight. Written
    `PATTERN` (weight 1) or `PATTERN:WEIGHT` on the command line and in config files."""

    pattern: str
    weight: float = 1.0

    @classmethod
    def parse(cls, text: str, flag: str) -> "WeightedSource":
        pattern, colon, weight_text = text.rpartition(":")
        if not colon or "/" in weight_text or os.path.exists(text):
            return cls(text)
        try:
            weight = float(weight_text)
        except ValueError:
            weight = math.nan
        require(math.isfinite(weight) and weight > 0, f"--{flag} {text}: the weight '{weight_text}' is not a "
                                                      f"positive number; write PATH or PATH:WEIGHT, e.g. a.jsonl:0.7")
        return cls(pattern, weight)

    def files(self, flag: str) -> list[str]:
        """The data files of this source, in a fixed (sorted) order, all of one format."""
        return source_files(self.pattern, flag)


def source_files(pattern: str, flag: str) -> list[str]:
    """A file, every data file under a directory (recursively), or a glob's matches: sorted, of one format, each
    checked as `check_data_file` checks a file. Nothing found is a usage error."""
    if os.path.isdir(pattern):
        found = [os.path.join(root, name) for root, _, names in os.walk(pattern) for name in names
                 if os.path.splitext(name)[1].lower() in DATA_FILE_EXTENSIONS]
        require(bool(found), f"--{flag} {pattern}: the directory holds no data file "
                             f"({', '.join(DATA_FILE_EXTENSIONS)})")
    elif glob.has_magic(pattern):
        found = [path for path in glob.glob(pattern, recursive=True) if not os.path.isdir(path)]
        require(bool(found), f"--{flag} {pattern}: the pattern matches no file; check the path and the quoting")
    else:
        found = [pattern]
    found = sorted(found)
    formats = {DATA_FILE_EXTENSIONS.get(os.path.splitext(path)[1].lower()) for path in found}
    require(len(formats) == 1 or None in formats, f"--{flag} {pattern} mixes formats "
                                                  f"({', '.join(sorted(f for f in formats if f))}); give one "
                                                  f"source per format")
    for path in found:
        check_data_file(path, flag)
    return found
