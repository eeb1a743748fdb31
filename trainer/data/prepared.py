"""A prepared data directory (written by `python -m trainer.prepare`): tokenized sequences in memory-mapped Arrow
shards, the tokenizer that made them, and a manifest that says how they were made.

    DIR/prepared_data.json        the manifest (below), written last
    DIR/tokenizer files           save_pretrained of the tokenizer
    DIR/<split>/shard-<i>/        datasets save_to_disk of shard i of the split (train, validation)

The manifest holds the job (mlm, clm, classify), the tokenizer's hash (`tokenizer_sha256`), the sequence length and
its flag, the job's other options that change the sequences (`token_options`), the text column (classify: and the
labels, in class-id order), where the text came from, and per split its shards with their sequence and token counts.
A job given the directory as --train_file opens the shards memory-mapped (O(1) in the corpus size) and refuses a
tokenizer, a length or an option that the sequences were not made with, instead of training on tokens that mean
something else.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass

from trainer.errors import require
from trainer.layout import PREPARED_MANIFEST_FILE, prepared_shard_dir

MANIFEST_FORMAT = 1  # raised when the directory's layout changes; a job refuses another format
SPLITS = ("train", "validation")


def is_prepared_directory(path: str | None) -> bool:
    """Whether `path` is a directory written by trainer.prepare (it holds the manifest)."""
    return bool(path) and os.path.isdir(path) and os.path.isfile(os.path.join(path, PREPARED_MANIFEST_FILE))


def tokenizer_sha256(tokenizer) -> str:
    """The hash of what decides the token ids: the tokenizer's serialized pipeline (tokenizer.json: normalizer,
    pre-tokenizer, model and vocabulary, added tokens, post-processor), without its truncation and padding state
    (which a call with truncation=True leaves behind), plus the special tokens by role. The same tokenizer saved
    and loaded again has the same hash. Tokenizers without a `tokenizers` backend hash their vocabulary instead."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        pipeline = json.loads(backend.to_str())
        pipeline.pop("truncation", None)
        pipeline.pop("padding", None)
    else:
        pipeline = {"class": type(tokenizer).__name__, "vocabulary": tokenizer.get_vocab()}
    described = {"pipeline": pipeline, "special_tokens": tokenizer.special_tokens_map}
    return hashlib.sha256(json.dumps(described, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


@dataclass(frozen=True)
class PreparedData:
    """An opened prepared directory: its manifest checked to be whole, its shards not yet read."""

    directory: str
    manifest: dict

    @property
    def where(self) -> str:
        return f"--train_file {self.directory}"

    @classmethod
    def open(cls, directory: str) -> "PreparedData":
        """The manifest of `directory`, checked: readable, of this format, every shard it names present."""
        path = os.path.join(directory, PREPARED_MANIFEST_FILE)
        fix = "prepare the data again with python -m trainer.prepare"
        try:
            with open(path) as handle:
                manifest = json.load(handle)
        except (OSError, ValueError) as error:
            detail = str(error).splitlines()[0] if str(error) else type(error).__name__
            require(False, f"--train_file {directory}: its manifest {PREPARED_MANIFEST_FILE} cannot be read "
                           f"({detail}); {fix}")
        keys = ("format", "job", "tokenizer_sha256", "sequence_length", "length_flag", "token_options", "splits")
        require(isinstance(manifest, dict) and all(key in manifest for key in keys)
                and all(split in manifest["splits"] for split in SPLITS),
                f"--train_file {directory}: its manifest {PREPARED_MANIFEST_FILE} is incomplete (it needs "
                f"{', '.join(keys)} and the splits {', '.join(SPLITS)}); {fix}")
        require(manifest["format"] == MANIFEST_FORMAT, f"--train_file {directory} is in prepared-data format "
                                                       f"{manifest['format']}, this trainer reads {MANIFEST_FORMAT}; "
                                                       f"{fix}")
        prepared = cls(directory, manifest)
        for split in SPLITS:
            for shard in prepared.shards(split):
                require(os.path.isdir(os.path.join(directory, shard["path"])),
                        f"--train_file {directory}: shard {shard['path']} named in its manifest is missing; {fix}")
        return prepared

    def shards(self, split: str) -> list[dict]:
        return self.manifest["splits"][split]["shards"]

    def check_job(self, job: str) -> None:
        require(self.manifest["job"] == job, f"{self.where} was prepared for trainer.{self.manifest['job']}, not "
                                             f"trainer.{job}; prepare it with --job {job}")

    def check_tokenizer(self, tokenizer, flag: str, name: str) -> None:
        require(tokenizer_sha256(tokenizer) == self.manifest["tokenizer_sha256"],
                f"{flag} {name} is not the tokenizer {self.where} was prepared with (its hash differs from the "
                f"manifest's); drop {flag} to use the directory's own tokenizer, or prepare the data with this one")

    def check_sequence_length(self, length: int) -> None:
        prepared, flag = self.manifest["sequence_length"], self.manifest["length_flag"]
        require(length == prepared, f"{flag} {length} does not match {self.where}, prepared with {flag} {prepared}; "
                                    f"give {flag} {prepared} or prepare the data again with {flag} {length}")

    def check_token_options(self, options: dict) -> None:
        prepared = self.manifest["token_options"]
        for name, value in options.items():
            require(prepared.get(name) == value, f"--{name} {value} does not match {self.where}, prepared with "
                                                 f"--{name} {prepared.get(name)}; give --{name} {prepared.get(name)} "
                                                 f"or prepare the data again")

    def split(self, split: str):
        """The split's shards as one Dataset, memory-mapped: opening costs O(shards), not O(tokens)."""
        import datasets

        parts = []
        for shard in self.shards(split):
            path = os.path.join(self.directory, shard["path"])
            try:
                part = datasets.load_from_disk(path)
            except Exception as error:  # datasets raises many types for a damaged shard
                detail = str(error).splitlines()[0] if str(error) else type(error).__name__
                require(False, f"{self.where}: shard {shard['path']} cannot be read ({type(error).__name__}: "
                               f"{detail}); prepare the data again with python -m trainer.prepare")
            require(len(part) == shard["sequences"], f"{self.where}: shard {shard['path']} holds {len(part)} "
                                                     f"sequences, its manifest says {shard['sequences']}; prepare "
                                                     f"the data again with python -m trainer.prepare")
            parts.append(part)
        return parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)


def shard_entry(split: str, index: int, dataset) -> dict:
    """The manifest's record of one written shard: where, how many sequences and tokens."""
    import pyarrow.compute as pc

    lengths = pc.list_value_length(dataset.data.column("input_ids"))  # list offsets only, no token read
    return {"path": prepared_shard_dir(split, index), "sequences": len(dataset),
            "tokens": int(pc.sum(lengths).as_py() or 0)}


def write_manifest(directory: str, manifest: dict) -> None:
    with open(os.path.join(directory, PREPARED_MANIFEST_FILE), "w") as handle:
        json.dump(manifest, handle, indent=2, sort_keys=True)
