"""The data section of the command line, and the data files a job reads (`DataFiles`)."""
from __future__ import annotations

import glob
import math
import os
from dataclasses import dataclass
from typing import NamedTuple, Optional

from trainer.config.parsing import arg
from trainer.data.prepared import is_prepared_directory
from trainer.data.urls import (exists, file_size, files_under, glob_files, is_directory, is_url, open_binary,
                               reading)
from trainer.errors import require
from trainer.layout import RESULTS_FILE

DATA_FILE_EXTENSIONS = {".txt": "text", ".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}


@dataclass
class CorpusArguments:
    """Where the text comes from and how much of it is used: what every job shares. How long a sequence is
    belongs to the job: `DataArguments.max_seq_length` (mlm, classify), `ClmArguments.block_size` (clm)."""

    _argument_group_name = "data"

    dataset_name: Optional[str] = arg(None, "Hub dataset name (needs network; with --streaming its data files are "
                                            "streamed from the Hub), or a local dataset directory. Unset with no "
                                            "--train_file(s): the embedded offline demo corpus.")
    dataset_config_name: Optional[str] = arg(None, "Configuration of --dataset_name.")
    train_file: Optional[str] = arg(None, "Training data: .txt, .json/.jsonl, .csv or .parquet, or a directory "
                                          "written by python -m trainer.prepare (tokenized once, opened at once); with "
                                          "--streaming also a directory or a glob of such files (quote it), local or "
                                          "a URL fsspec opens (hf://, s3://, https://, ...).")
    train_files: list[str] = arg(
        [], "Training data as a weighted mixture, instead of --train_file or --dataset_name: one or more sources "
        "PATTERN[:WEIGHT], each a file, a directory (its data files, recursively) or a glob (quote it), read as one "
        "data set, weight 1 when left out; e.g. --train_files a.jsonl:0.7 'b/*.txt':0.3. Every global batch of G "
        "sequences (per-device batch x processes x accumulation) holds exactly round(w / sum(w) x G) of each source "
        "after the first (halves up, at least one) and the rest of the first, in the same positions every step, "
        "so the mix is exact at every step and world size. The first source is primary: its passes are the epochs, "
        "and the evaluation data is held out of it unless --validation_file is given. The others cycle, each in a "
        f"fresh seeded order per pass. The log and {RESULTS_FILE} report the samples and (unpadded) tokens taken "
        f"from each.", nargs="+")
    validation_file: Optional[str] = arg(None, "Evaluation data, same formats. Unset: split off the training data "
                                               "(with --train_files: off its first, primary source; with --streaming it "
                                               "is needed).")
    text_column: Optional[str] = arg(None, "Column holding the text (default: 'text', or the only/first string "
                                           "column).")
    validation_split_percentage: int = arg(5, "Percent of the training data held out for evaluation when no "
                                              "validation data is given.")
    preprocessing_num_workers: Optional[int] = arg(None, "Processes for tokenization.")
    overwrite_cache: bool = arg(False, "Tokenize again instead of reusing the datasets cache.")
    max_train_samples: Optional[int] = arg(None, "Keep only this many training sequences (debugging; with "
                                                 "--train_files, of the primary source).")
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
        self.check_urls()
        self.check_train_files()
        for flag in ("train_file", "validation_file"):
            path = getattr(self, flag)
            # A prepared directory (python -m trainer.prepare) is checked by its manifest when the job opens it; a
            # stream takes a directory or glob too, its files checked as it opens them.
            if path is not None and not self.streaming and not (flag == "train_file" and is_prepared_directory(path)):
                check_data_file(path, flag)
        require(self.shuffle_buffer_size > 0, f"--shuffle_buffer_size must be positive, got "
                                              f"{self.shuffle_buffer_size}")
        require(not (self.streaming and self.max_train_samples), "--max_train_samples does not apply to "
                                                                 "--streaming: the run's length is --max_steps")
        require(0 < self.validation_split_percentage < 100, "--validation_split_percentage must be in 1..99")
        for flag in ("preprocessing_num_workers", "max_train_samples", "max_eval_samples"):
            value = getattr(self, flag)
            require(value is None or value > 0, f"--{flag} must be positive, got {value}")


    def check_urls(self) -> None:
        """Before any file is looked at (a URL may be slow to reach): URLs only with --streaming."""
        if self.streaming:
            return
        for flag in ("train_file", "validation_file"):
            url_needs_streaming(flag, getattr(self, flag))
        for source in self.train_sources():
            url_needs_streaming("train_files", source.pattern)

    def check_train_files(self) -> None:
        """--train_files alone names the training data, each source once, each with data files."""
        if not self.train_files:
            return
        for flag in ("train_file", "dataset_name"):
            require(getattr(self, flag) is None, f"give either --train_files or --{flag}, not both (a mixture of "
                                                 f"one source is --train_files PATH)")
        sources = self.train_sources()
        patterns = [source.pattern for source in sources]
        for pattern in patterns:
            require(patterns.count(pattern) == 1, f"--train_files names {pattern} twice; give each source once, "
                                                  f"with its weight")
        for source in sources:
            source.files("train_files")

    def train_sources(self) -> list["WeightedSource"]:
        """The --train_files sources, in order (the primary first); none without --train_files."""
        return [WeightedSource.parse(text, "train_files") for text in self.train_files]


@dataclass
class DataArguments(CorpusArguments):
    max_seq_length: int = arg(128, "Tokens per training sequence (must not exceed the model's positions).")

    def __post_init__(self):
        super().__post_init__()
        require(self.max_seq_length > 0, "--max_seq_length must be positive")


def check_data_file(path: str, flag: str) -> None:
    """A local path or a URL (trainer.data.urls) names a non-empty data file of a supported format."""
    url = is_url(path)
    require(url or os.path.exists(path) or not os.path.islink(path), f"--{flag} {path} is a broken symbolic link "
                                                                     f"(its target is missing, or a symbolic link "
                                                                     f"loop)")
    require(exists(path, flag), f"--{flag} {path}: no such file")
    require(not is_directory(path, flag), f"--{flag} {path} is a directory; give a file (a directory "
                                          f"or glob of files takes --streaming)")
    extension = os.path.splitext(path)[1].lower()
    require(extension in DATA_FILE_EXTENSIONS,
            f"--{flag} {path}: unsupported extension '{extension}'; use one of {', '.join(DATA_FILE_EXTENSIONS)}")
    require(url or os.access(path, os.R_OK), f"--{flag} {path} is not readable; check its permissions")
    with reading(path, flag):
        require(file_size(path) > 0, f"--{flag} {path} is empty")
        if DATA_FILE_EXTENSIONS[extension] == "text":
            check_holds_text_lines(path, flag)


def url_needs_streaming(flag: str, path: Optional[str]) -> None:
    """Only --streaming reads a URL: the map-style loaders read local files."""
    require(path is None or not is_url(path), f"--{flag} {path} is a URL, which only --streaming reads; add "
                                              f"--streaming, or download the file and give its local path")


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
    with open_binary(path) as handle:
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

    train: Optional[str]  # the one training file (--train_file or the demo's); None with --train_files
    validation: Optional[str]
    replay: Optional[str] = None  # --replay_file (trainer.continual)
    mixture: tuple["WeightedSource", ...] = ()  # --train_files: the sources, the primary first

    def primary_source(self) -> "SourceFiles":
        """The primary training source's files (--train_files' first, or --train_file)."""
        if self.mixture:
            return SourceFiles("train_files", self.mixture[0].pattern, self.mixture[0].files("train_files"))
        return SourceFiles("train_file", self.train, [self.train])

    def other_sources(self) -> list["SourceFiles"]:
        """Every training source after the primary, in mixture order (trainer.data.mixture): --train_files'
        others, then --replay_file."""
        others = [SourceFiles("train_files", source.pattern, source.files("train_files"))
                  for source in self.mixture[1:]]
        return others + ([SourceFiles("replay_file", self.replay, [self.replay])] if self.replay else [])


class SourceFiles(NamedTuple):
    """A training source's data files, and the flag and name that gave them (for messages)."""

    flag: str  # e.g. "train_files"
    name: str  # the pattern or path given
    files: list[str]

    def __str__(self) -> str:
        return f"--{self.flag} {self.name}"

    @property
    def role(self) -> str:
        """What messages call its data: "the replay data", "the --train_files b.jsonl data"."""
        return "replay" if self.flag == "replay_file" else str(self)


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
    """A file, every data file under a directory (recursively), or a glob's matches, local or URLs: sorted, of one
    format, each checked as `check_data_file` checks a file. Nothing found is a usage error."""
    if is_directory(pattern, flag):
        found = [path for path in files_under(pattern, flag)
                 if os.path.splitext(path)[1].lower() in DATA_FILE_EXTENSIONS]
        require(bool(found), f"--{flag} {pattern}: the directory holds no data file "
                             f"({', '.join(DATA_FILE_EXTENSIONS)})")
    elif glob.has_magic(pattern):
        found = glob_files(pattern, flag)
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
