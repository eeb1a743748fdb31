"""A data file by local path or by URL (hf://, s3://, https://, memory://: anything fsspec opens), the way datasets'
own streaming reads them: the one place where --streaming's files are listed, sized and opened.

A URL is opened, sized and listed through fsspec. A local path reads as it always did, as fast: the built-in `open`,
pyarrow's own local file system (fsspec's local one hands parquet files to it), Python's `os.walk` and `glob` (their
order and hidden-file rules are what users already rely on)."""
from __future__ import annotations

import contextlib
import glob
import os

import fsspec
from fsspec.core import split_protocol, url_to_fs

from trainer.errors import DataSourceFailed, UsageError


def is_url(path: str) -> bool:
    """Whether `path` names its file system (`hf://...`, `memory://...`), rather than being a local path."""
    return split_protocol(path)[0] is not None


def raise_unreadable(path: str, error: Exception, flag: str, usage: bool = False, where: str = ""):
    """A file that cannot be read: bad input before training (`usage`), a failed source during it."""
    detail = str(error).splitlines()[0] if str(error) else ""
    message = f"--{flag} {path}{where} could not be read: {type(error).__name__}: {detail}"
    if usage:
        raise UsageError(message)
    raise DataSourceFailed(message)


@contextlib.contextmanager
def reading(path: str, flag: str):
    """Before training: what a file system raises about `path` as one line. Each raises its own types (network,
    credentials, an unknown protocol, a missing fsspec back-end such as s3fs), hence the broad except."""
    try:
        yield
    except UsageError:
        raise
    except FileNotFoundError:
        raise UsageError(f"--{flag} {path}: no such file") from None
    except Exception as error:
        raise_unreadable(path, error, flag, usage=True)


def exists(path: str, flag: str) -> bool:
    if not is_url(path):
        return os.path.exists(path)
    with reading(path, flag):
        fs, inner = url_to_fs(path)
        try:  # not fs.exists: it answers False to any error, e.g. no network
            fs.info(inner)
        except FileNotFoundError:
            return False
        return True


def is_directory(path: str, flag: str) -> bool:
    if not is_url(path):
        return os.path.isdir(path)
    with reading(path, flag):
        fs, inner = url_to_fs(path)
        return fs.isdir(inner)


def files_under(directory: str, flag: str) -> list[str]:
    """Every file under `directory`, recursively."""
    if not is_url(directory):
        return [os.path.join(root, name) for root, _, names in os.walk(directory) for name in names]
    with reading(directory, flag):
        fs, inner = url_to_fs(directory)
        return [fs.unstrip_protocol(path) for path in fs.find(inner)]


def glob_files(pattern: str, flag: str) -> list[str]:
    """The files (not directories) that `pattern` matches (`**` spans directories)."""
    if not is_url(pattern):
        return [path for path in glob.glob(pattern, recursive=True) if not os.path.isdir(path)]
    with reading(pattern, flag):
        fs, inner = url_to_fs(pattern)
        return [fs.unstrip_protocol(path) for path, info in fs.glob(inner, detail=True).items()
                if info["type"] != "directory"]


def file_size(path: str) -> int:
    fs, inner = url_to_fs(path)
    return fs.size(inner)


def open_binary(path: str):
    """`path` opened to read bytes, as a context manager. A local path by the built-in `open`: fsspec's local file
    wraps it, adding a Python call to every readline (a fifth more time to read a .txt corpus)."""
    return fsspec.open(path, "rb") if is_url(path) else open(path, "rb")


def parquet_file(path: str):
    """`path` as a pyarrow ParquetFile (read by row group; pyarrow reads a local file with its own file system)."""
    import pyarrow.parquet as pq

    fs, inner = url_to_fs(path)
    return pq.ParquetFile(inner, filesystem=fs)
