"""--streaming: training text read, tokenized and packed as the run goes, in one global order fixed by the seed and
independent of the world size, resumable at once from a few numbers per lane.

Lanes. A global batch has G = per-device batch x processes x accumulation slots; slot g of every step is fed by
lane g (the same slot layout as `GlobalBatchSampler`: micro-step m of rank r takes slots
[(m x world size + r) x batch, +batch)). Slot g's lane is lane `index` of the `lanes` lanes of its source: a
weighted mixture (--train_files, --replay_file) gives source i the slots trainer.data.mixture gives it for map-style
data (`mixture_counts`, `slot_sources`), each source's lanes reading its own files. The primary source (0) is read at
most --num_train_epochs passes; the others cycle, pass after pass. Each pass ("epoch") over a source
shuffles its files by a permutation seeded by (seed, pass), lays them end to end, and cuts that space into `lanes`
equal parts: bytes for .txt/.json/.jsonl/.csv (a line belongs to the part its first byte lies in), rows for .parquet.
A lane reads its part sequentially in windows of --shuffle_buffer_size documents, each window permuted by a
generator seeded by (seed, source, pass, lane, window start), tokenizes, and cuts its own token stream into blocks
exactly as the map-style job does (run_mlm/run_clm's concatenate-and-chunk, or one sequence per line). A lane that
ends its part goes on with the next pass. Every lane yields one block per optimizer step.

So the samples of a step do not depend on the world size, and a rank reads, tokenizes and (the per-sample stage of
a `SampleWiseCollator`, e.g. mlm's masks) collates only its own lanes' blocks: preprocessing is spread over every
rank and its loader workers. A lane's position after a block is (pass, window start, document index in the window,
tokens of that document already used, blocks yielded, their tokens: the per-source figures): the block boundary
always falls inside a document or at its end, so no token ids need to be carried in the state. A resume seeks to the
window start and re-reads that one window (never the data before it), re-tokenizing from the saved document on.
Positions ride along with every micro-batch, so the state is that of what the engine consumed,
whatever the loader has prefetched; the checkpoint holds every lane's position (gathered from all ranks), so a
resume at any world size continues the same global order.

Files are local paths or URLs (hf://, s3://, https://, memory://: whatever fsspec opens, as datasets' own streaming
reads them; trainer.data.urls), and --dataset_name resolves a Hub dataset's data files per split as datasets does.
The reader is hand-written nonetheless: datasets' streaming `IterableDataset` shards by file across ranks and workers
(the order then depends on the world size) and resumes by replaying its shuffle buffer, with no seek to a position;
transformers' Trainer skips consumed batches one by one.
"""
from __future__ import annotations

import csv
import json
import math
import os
from dataclasses import dataclass
from typing import Callable, Iterator, Optional

import numpy as np
import torch

from trainer.data.batches import SampleWiseCollator
from trainer.data.mixture import MixtureSource, describe_sources, mixture_counts, slot_sources
from trainer.data.urls import file_size, open_binary, parquet_file, raise_unreadable, reading
from trainer.distributed.collectives import all_gather_objects
from trainer.errors import DataSourceFailed, UsageError, require
from trainer.hub.reachability import check_loadable

WINDOW_SEED_KEY, FILE_ORDER_KEY = 0x57_12_EA, 0xF1_1E_5  # keep these draws apart from every other seeded stream
ENCODE_BATCH = 64  # documents per call of the (fast, batch-encoding) tokenizer


# ------------------------------------------------------------------------------------------------------ files
@dataclass(frozen=True)
class StreamFile:
    """One data file as the stream reads it: its records lie in [start, end) of its own units (bytes; rows of a
    parquet file), after a csv file's header line."""

    path: str
    kind: str  # "text", "json", "csv" or "parquet"
    start: int
    end: int
    column_index: int = 0  # csv: the text column's field

    @property
    def size(self) -> int:
        return self.end - self.start


def stream_file(path: str, kind: str, text_column: str, flag: str) -> StreamFile:
    """`path` described for the stream, its first record checked to have `text_column` (a .txt file's lines are
    the column "text")."""
    with reading(path, flag):  # pyarrow, json and remote file systems raise many types for what they cannot read
        if kind == "parquet":
            handle = parquet_file(path)
            names = handle.schema_arrow.names
            require(text_column in names, no_column(flag, path, text_column, names))
            return StreamFile(path, kind, 0, handle.metadata.num_rows)
        size = file_size(path)
        first = first_line(path) if kind in ("csv", "json") else b""
        if kind == "csv":
            names = next(csv.reader([first.decode("utf-8-sig", errors="replace")]))
            require(text_column in names, no_column(flag, path, text_column, names))
            return StreamFile(path, kind, len(first), size, names.index(text_column))
        record = json.loads(first) if kind == "json" else None
    if kind == "json":
        require(isinstance(record, dict), f"--{flag} {path}: its first line is not a JSON object; --streaming reads "
                                          f"JSON lines (one object per line)")
        require(text_column in record, no_column(flag, path, text_column, list(record)))
    else:
        require(text_column == "text", f"--text_column {text_column}: a .txt file has one column, 'text'")
    return StreamFile(path, kind, 0, size)


def first_line(path: str) -> bytes:
    with open_binary(path) as handle:
        return handle.readline()


def no_column(flag: str, path: str, column: str, names) -> str:
    return (f"--{flag} {path} has no column '{column}' (columns: {', '.join(names)}); name the text column with "
            f"--text_column")


def stream_text_column(path: str, kind: str, requested: Optional[str]) -> str:
    """--text_column, or (as for map-style data) 'text' when the first file has it, else its first string column
    (an unreadable first file: 'text', and `stream_file` names the problem)."""
    if requested or kind == "text":
        return requested or "text"
    try:
        if kind == "parquet":
            import pyarrow as pa

            schema = parquet_file(path).schema_arrow
            names = [f.name for f in schema if pa.types.is_string(f.type) or pa.types.is_large_string(f.type)]
        elif kind == "csv":
            names = next(csv.reader([first_line(path).decode("utf-8-sig", errors="replace")]))
        else:
            names = [name for name, value in json.loads(first_line(path)).items() if isinstance(value, str)]
    except Exception:  # pyarrow, csv, json and file systems raise many types for a file that is not what it says
        names = []
    return "text" if "text" in names or not names else names[0]


# ----------------------------------------------------------------------------------------------------- corpus
class StreamCorpus:
    """A source's files, each pass laid end to end in its own seeded order, read from any offset of that space.

    `documents_read` counts the documents read, for the test that a resume reads one window, not the consumed
    data."""

    def __init__(self, files: list[StreamFile], text_column: str, seed: int, flag: str, keep_linebreaks: bool):
        self.files, self.text_column, self.seed, self.flag = files, text_column, seed, flag
        self.keep_linebreaks = keep_linebreaks
        self.documents_read = 0

    @property
    def size(self) -> int:
        return sum(file.size for file in self.files)

    def pass_files(self, epoch: int) -> list[StreamFile]:
        order = np.random.default_rng([self.seed, FILE_ORDER_KEY, epoch]).permutation(len(self.files))
        return [self.files[i] for i in order]

    def part(self, lane: int, lanes: int) -> tuple[int, int]:
        """Lane `lane`'s part of every pass: [start, end) of the pass's space."""
        return lane * self.size // lanes, (lane + 1) * self.size // lanes

    def read(self, epoch: int, start: int, end: int, limit: int) -> tuple[list[str], int]:
        """Up to `limit` non-empty documents of pass `epoch` that begin in [start, end), and the offset after the
        last one read (where the next read starts)."""
        documents, offset, file_start = [], start, 0
        for file in self.pass_files(epoch):
            file_end = file_start + file.size
            if offset < file_end and file_start < end and len(documents) < limit:
                read, local = self.read_file(file, file.start + max(offset - file_start, 0),
                                             file.start + min(end, file_end) - file_start, limit - len(documents))
                documents.extend(read)
                offset = file_start + local - file.start
            file_start = file_end
        self.documents_read += len(documents)
        return documents, offset

    def read_file(self, file: StreamFile, offset: int, end: int, limit: int) -> tuple[list[str], int]:
        """(documents beginning in [offset, end) of `file`, at most `limit`; the local offset after them)."""
        try:
            if file.kind == "parquet":
                return self.read_rows(file, offset, end, limit)
            return self.read_lines(file, offset, end, limit)
        except DataSourceFailed:
            raise
        # Removed, truncated, corrupt, not UTF-8; or a remote file system's own error (network, credentials).
        except Exception as error:
            raise_unreadable(file.path, error, self.flag)

    def read_lines(self, file: StreamFile, offset: int, end: int, limit: int) -> tuple[list[str], int]:
        documents = []
        with open_binary(file.path) as handle:
            if offset > file.start:  # inside a line: it belongs to the part its first byte is in
                handle.seek(offset - 1)
                if handle.read(1) != b"\n":
                    handle.readline()
            else:
                handle.seek(offset)
            position = handle.tell()
            while position < end and len(documents) < limit:
                line = handle.readline()
                if not line:
                    break
                text = self.record_text(file, line, position)
                position += len(line)
                if text and not text.isspace():
                    documents.append(text)
        return documents, position

    def record_text(self, file: StreamFile, line: bytes, position: int) -> Optional[str]:
        where = f" (byte {position})"
        try:
            decoded = line.decode("utf-8")
        except UnicodeDecodeError as error:
            raise_unreadable(file.path, error, self.flag, where=where)
        if file.kind == "text":
            if position == 0:
                decoded = decoded.removeprefix("\ufeff")
            return decoded if self.keep_linebreaks else decoded.rstrip("\r\n")
        if not decoded.strip():
            return None
        if file.kind == "csv":
            fields = next(csv.reader([decoded], strict=True))
            value = fields[file.column_index] if file.column_index < len(fields) else None
        else:
            try:
                record = json.loads(decoded)
            except ValueError as error:
                raise_unreadable(file.path, error, self.flag, where=where)
            value = record.get(self.text_column) if isinstance(record, dict) else None
        if value is not None and not isinstance(value, str):
            raise DataSourceFailed(f"--{self.flag} {file.path}{where}: column '{self.text_column}' holds "
                                   f"{type(value).__name__} values, not text; fix the data")
        return value

    def read_rows(self, file: StreamFile, offset: int, end: int, limit: int) -> tuple[list[str], int]:
        handle = parquet_file(file.path)
        documents, group_start, position = [], 0, offset
        for group in range(handle.num_row_groups):
            rows = handle.metadata.row_group(group).num_rows
            if group_start + rows > position and position < end and len(documents) < limit:
                values = handle.read_row_group(group, columns=[self.text_column]).column(0).to_pylist()
                for value in values[position - group_start:end - group_start]:
                    position += 1
                    if value is not None and not isinstance(value, str):
                        raise DataSourceFailed(f"--{self.flag} {file.path}: column '{self.text_column}' holds "
                                               f"{type(value).__name__} values, not text; fix the data")
                    if value and not value.isspace():
                        documents.append(value)
                        if len(documents) == limit:
                            break
            group_start += rows
        return documents, position


# ------------------------------------------------------------------------------------------------------ lanes
@dataclass(frozen=True)
class TrainStream:
    """What a job streams: its corpus, how a list of texts becomes token columns (`encode`, a picklable callable:
    {column: [ids per text]}), and how blocks are cut: `block_size` tokens of the concatenated stream, or with
    `one_per_document` each document on its own (truncated by `encode`)."""

    corpus: StreamCorpus
    encode: Callable[[list[str]], dict]
    block_size: int
    one_per_document: bool
    window: int  # documents per shuffle window (--shuffle_buffer_size)


@dataclass(frozen=True)
class LaneId:
    slot: int  # of the global batch
    source: int
    index: int  # among its source's lanes
    lanes: int  # of its source


# A lane's position: (pass, window start (-1: its part's start), document in the window, its tokens used, blocks,
# their tokens).
START = (0, -1, 0, 0, 0, 0)


class StreamEnded(DataSourceFailed):
    """A lane would start a pass beyond the passes allowed."""


def global_lanes(global_batch_size: int, counts: Optional[list[int]] = None) -> list[LaneId]:
    """Every slot's lane: its source (trainer.data.mixture layout) and its index among that source's lanes."""
    counts = counts or [global_batch_size]
    owners = slot_sources(counts).tolist()
    seen = [0] * len(counts)
    lanes = []
    for slot, source in enumerate(owners):
        lanes.append(LaneId(slot, source, seen[source], counts[source]))
        seen[source] += 1
    return lanes


def rank_slots(per_device: int, world_size: int, rank: int, accumulation: int) -> list[list[int]]:
    """The slots of each of a rank's micro-steps, as `GlobalBatchSampler` shards a global batch."""
    return [[(micro * world_size + rank) * per_device + i for i in range(per_device)] for micro in range(accumulation)]


def lane_blocks(stream: TrainStream, lane: LaneId, position, passes: Optional[int], seed: int) -> Iterator[tuple]:
    """Lane `lane`'s blocks from `position`, each as (token columns, the position after it). Ends the run with
    `DataSourceFailed` when a lane would start pass `passes` (the data ran out before --max_steps; None: a cycling
    source, never), or when its part of a pass holds no text (a cycling source would look for it forever)."""
    corpus = stream.corpus
    epoch, window_start, document, token, blocks, tokens = position
    part_start, part_end = corpus.part(lane.index, lane.lanes)
    carry: dict = {}
    while True:
        require_passes(epoch, passes, corpus)
        start = part_start if window_start < 0 else window_start
        while True:
            texts, next_start = corpus.read(epoch, start, part_end, stream.window)
            if not texts:
                if passes is None and start == part_start:
                    raise DataSourceFailed(no_text_in_part(corpus, lane))
                break
            order = np.random.default_rng([seed, WINDOW_SEED_KEY, lane.source, epoch, lane.index, start]
                                          ).permutation(len(texts))
            for first in range(document, len(texts), ENCODE_BATCH):
                chosen = [texts[i] for i in order[first:first + ENCODE_BATCH]]
                encoded = stream.encode(chosen)  # one row per text: blank texts never reach it (`read`)
                for offset in range(len(chosen)):
                    columns = {name: rows[offset] for name, rows in encoded.items()}
                    index = first + offset
                    for block, used in cut(columns, carry, token if index == document else 0, stream):
                        blocks, tokens = blocks + 1, tokens + len(block["input_ids"])
                        after = (epoch, start, index + 1, 0) if used is None else (epoch, start, index, used)
                        yield block, (*after, blocks, tokens)
                    token = 0
            start, document = next_start, 0
        epoch, window_start, document, token = epoch + 1, -1, 0, 0


def require_passes(epoch: int, passes: Optional[int], corpus: StreamCorpus) -> None:
    if passes is not None and epoch >= passes:
        raise StreamEnded(
            f"the training data ({len(corpus.files)} file(s) of --{corpus.flag}) ended after {passes} pass(es) "
            f"(--num_train_epochs) before --max_steps; give more data, a larger --num_train_epochs or a smaller "
            f"--max_steps")


def no_text_in_part(corpus: StreamCorpus, lane: LaneId) -> str:
    return (f"--{corpus.flag} {', '.join(file.path for file in corpus.files[:3])}: lane {lane.index} of its "
            f"{lane.lanes} (its share of every global batch) finds no text in its 1/{lane.lanes} of the data; give "
            f"the source more text, or fewer lanes (a smaller weight or global batch)")


def cut(columns: dict, carry: dict, skip: int, stream: TrainStream):
    """The blocks one document completes: (block, tokens of the document used so far, or None when it is used up
    at the block's end). `carry` (the tokens of earlier documents not yet in a block) is updated in place."""
    if stream.one_per_document:
        yield {name: np.asarray(ids, dtype=np.int64) for name, ids in columns.items()}, None
        return
    length = len(next(iter(columns.values())))
    size, used = stream.block_size, skip
    carried = len(carry.get("input_ids", ()))
    while carried + length - used >= size:
        take = size - carried
        block = {name: np.asarray([*carry.get(name, ()), *ids[used:used + take]], dtype=np.int64)
                 for name, ids in columns.items()}
        used, carried = used + take, 0
        carry.clear()
        yield block, (None if used == length else used)
    for name, ids in columns.items():
        carry[name] = [*carry.get(name, ()), *ids[used:]]


class RankLanes(torch.utils.data.IterableDataset):
    """This rank's lanes, as parts of its micro-batches. With n loader workers, worker w owns part w of the lanes
    of every micro-step (n contiguous parts); torch's loader takes one item from each worker in turn, so n
    consecutive items are one micro-batch. A lane's state thus lives in one worker, and so does the per-sample stage
    of collation (`rows`, e.g. mlm's masks) of its blocks. Errors come as items (`error`), so that the main process
    ends the run with one line, not a worker's traceback."""

    def __init__(self, streams: list[TrainStream], micro_slots: list[list[int]], lanes: list[LaneId],
                 positions: dict, workers: int, passes: int, seed: int, rows: Callable[[dict], dict]):
        self.streams, self.micro_slots, self.lanes, self.positions = streams, micro_slots, lanes, positions
        self.workers, self.passes, self.seed, self.rows = max(workers, 1), passes, seed, rows
        self.global_batch_size = len(lanes)

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker = info.id if info is not None else 0
        parts = [slots[worker * len(slots) // self.workers:(worker + 1) * len(slots) // self.workers]
                 for slots in self.micro_slots]
        running = {slot: self.blocks(self.lanes[slot], self.positions[slot]) for slots in parts for slot in slots}
        try:
            while True:
                for slots in parts:
                    blocks, positions = zip(*(next(running[slot]) for slot in slots))
                    yield {"rows": self.rows(self.part_batch(blocks, slots, positions)), "slots": slots,
                           "positions": list(positions)}
        except DataSourceFailed as failure:
            yield {"error": str(failure)}

    def part_batch(self, blocks, slots: list[int], positions) -> dict:
        """A part of a micro-batch as the map-style loader gives a batch: token columns, sample ids, epoch."""
        batch = {name: [block[name] for block in blocks] for name in blocks[0]}
        if not self.streams[0].one_per_document:  # full blocks: one array, as the map-style loader gives them
            batch = {name: np.stack(rows) for name, rows in batch.items()}
        # Unique over the run and independent of the world size: the lane's block count and the slot.
        batch["sample_id"] = np.asarray([(position[4] - 1) * self.global_batch_size + slot
                                         for slot, position in zip(slots, positions)], dtype=np.int64)
        batch["epoch"] = 0  # the sample ids never repeat: masks need no pass number
        return batch

    def blocks(self, lane: LaneId, position) -> Iterator[tuple]:
        """The lane's blocks over its source's stream: the primary's for at most `passes` passes, the others'
        cycling."""
        return lane_blocks(self.streams[lane.source], lane, position, self.passes if lane.source == 0 else None,
                           self.seed)


def as_is(item):
    return item


def collation_stages(collator) -> tuple[Callable[[dict], dict], Callable[[dict], dict]]:
    """(the per-sample stage, run in the loader workers; the batch stage, run on whole micro-batches) of a training
    collator: a `SampleWiseCollator`'s `rows` and `assemble`, or nothing and the whole collator."""
    if isinstance(collator, SampleWiseCollator):
        return collator.rows, collator.assemble
    return as_is, collator


def joined(parts: list[dict]) -> dict:
    """One micro-batch's rows from its parts' (in slot order): arrays concatenated, lists joined, the rest (e.g.
    the epoch) the same in every part."""
    first = parts[0]
    return {name: np.concatenate([part[name] for part in parts]) if isinstance(value, np.ndarray)
            else [row for part in parts for row in part[name]] if isinstance(value, list) else value
            for name, value in first.items()}


SMALL_PART = 1 << 16  # bytes (rows of a parquet source) of a lane's part checked for text before training


class StreamingBatches:
    """The engine's training data under --streaming: `TrainingBatches`'s methods over lanes (module docstring), of
    one stream per training source (`streams`, in the order of `sources`: the primary first).

    The run's length is --max_steps (`steps_per_epoch` is None: a stream's length is not known)."""

    steps_per_epoch = None
    reads_during_training = True  # a file can turn unreadable mid-run: the ranks agree to stop (Engine)

    def __init__(self, streams: list[TrainStream], sources: list[MixtureSource], collator, per_device: int,
                 world_size: int, rank: int, accumulation: int, workers: int, passes: int, seed: int):
        self.streams, self.sources = streams, sources
        self.rows, self.assemble = collation_stages(collator)
        self.per_device, self.world_size, self.accumulation = per_device, world_size, accumulation
        self.global_batch_size = per_device * world_size * accumulation
        self.counts = mixture_counts(sources, self.global_batch_size)
        self.micro_slots = rank_slots(per_device, world_size, rank, accumulation)
        self.lanes = global_lanes(self.global_batch_size, self.counts)
        self.workers = min(workers, per_device)  # each worker owns at least one lane of each micro-step
        self.passes, self.seed = passes, seed
        self.positions = {lane.slot: START for lane in self.lanes}  # after the last completed step
        self.pending: dict = {}  # after the micro-batches of the step under way
        self.gathered: Optional[dict] = None
        self.check_small_parts_hold_text()

    def check_small_parts_hold_text(self) -> None:
        """Before anything is written: a lane whose part of a pass holds no document stops the run at its first
        step (`lane_blocks`). A part of a few bytes can: a small source (a replay file, a light mixture source) cut
        into many lanes. Each part under SMALL_PART bytes (rows) reads its first document now, on every rank (the
        same answer everywhere); larger parts are left to `lane_blocks` (reading one from each would cost a
        request per lane on remote storage)."""
        for lane in self.lanes:
            corpus = self.streams[lane.source].corpus
            start, end = corpus.part(lane.index, lane.lanes)
            if end - start < SMALL_PART:
                try:
                    texts, _ = corpus.read(0, start, end, limit=1)
                except DataSourceFailed as failure:  # before training: bad input
                    raise UsageError(str(failure)) from None
                require(bool(texts), no_text_in_part(corpus, lane))

    @property
    def own_slots(self) -> list[int]:
        return [slot for slots in self.micro_slots for slot in slots]

    @property
    def epoch(self) -> int:
        """The pass the slowest of this rank's lanes of the primary source is in (0 on a rank with none)."""
        return min((self.positions[slot][0] for slot in self.own_slots if self.lanes[slot].source == 0), default=0)

    def describe(self) -> list[str]:
        sizes = [f"{len(stream.corpus.files)} file(s) ({stream.corpus.size} "
                 f"{'rows' if stream.corpus.files[0].kind == 'parquet' else 'bytes'})" for stream in self.streams]
        return [f"{self.global_batch_size} sequences/step ({self.per_device} per device x {self.world_size} "
                f"processes x {self.accumulation} accumulation), streamed from "
                f"{sizes[0] if len(sizes) == 1 else f'{len(sizes)} sources'} in "
                f"{self.global_batch_size} lanes, shuffled in windows of {self.streams[0].window} documents, "
                f"at most {self.passes} pass(es)", *describe_sources(self.sources, self.counts, sizes)]

    def describe_position(self) -> str:
        return f"pass {self.epoch} of the stream (slowest lane of this rank)"

    def micro_batches(self):
        """Micro-batches forever from the current position; each one's lane positions go into `pending`."""
        self.pending = {}
        dataset = RankLanes(self.streams, self.micro_slots, self.lanes, self.positions, self.workers, self.passes,
                            self.seed, self.rows)
        loader = torch.utils.data.DataLoader(dataset, batch_size=None, collate_fn=as_is, num_workers=self.workers,
                                             prefetch_factor=4 if self.workers else None)
        # Assembled here: a micro-batch is whole only here (its lanes come from every worker).
        items = iter(loader)
        while True:
            parts = [next(items) for _ in range(max(self.workers, 1))]
            failed = [part["error"] for part in parts if "error" in part]
            if failed:
                raise DataSourceFailed(failed[0])
            for part in parts:
                self.pending.update(zip(part["slots"], part["positions"]))
            yield self.assemble(joined([part["rows"] for part in parts]))

    def advance(self) -> None:
        """One optimizer step's micro-batches consumed: their lanes' positions are the position."""
        self.positions.update(self.pending)
        self.pending = {}

    def consumed(self) -> dict:
        """For the final metrics (every rank calls it): the blocks trained on from each source and their tokens
        (unpadded, as map-style data counts them), summed over its lanes."""
        self.gather_across_ranks()
        samples, tokens = [0] * len(self.sources), [0] * len(self.sources)
        for slot, position in self.gathered.items():
            samples[self.lanes[slot].source] += position[4]
            tokens[self.lanes[slot].source] += position[5]
        names = [source.name for source in self.sources]
        return {"train_samples_per_source": dict(zip(names, samples)),
                "train_tokens_per_source": dict(zip(names, tokens))}

    def gather_across_ranks(self) -> None:
        """Called on every rank before a checkpoint: every lane's position, from the rank that owns it."""
        own = {slot: self.positions[slot] for slot in self.own_slots}
        self.gathered = {slot: position for part in all_gather_objects(own) for slot, position in part.items()}

    def state_dict(self) -> dict:
        positions = self.gathered if self.gathered is not None else self.positions
        return {"global_batch_size": self.global_batch_size, "counts": list(self.counts),
                "lanes": {str(slot): list(position) for slot, position in sorted(positions.items())}}

    def load_state_dict(self, saved: dict) -> None:
        require("lanes" in saved, "the checkpoint was written by a run on map-style data, which --streaming cannot "
                                  "continue; resume it without --streaming, or start afresh")
        require(saved["global_batch_size"] == self.global_batch_size,
                f"the checkpoint streamed {saved['global_batch_size']} lanes (its global batch) and this run has "
                f"a global batch of {self.global_batch_size}; resume with the same per-device batch x processes x "
                f"accumulation")
        require(all(len(position) == len(START) for position in saved["lanes"].values()),
                "the checkpoint's lane positions predate per-source token counts under --streaming; resume it with "
                "the trainer version that wrote it, or start a new run")
        require(saved["counts"] == self.counts,
                f"the checkpoint streamed {saved['counts']} sequences of each training source per step and this "
                f"run's sources (--train_files weights, --replay_ratio) give {self.counts}; resume with the same "
                f"sources and weights")
        self.positions = {int(slot): tuple(position) for slot, position in saved["lanes"].items()}


# ------------------------------------------------------------------------------------------------- building
def open_corpus(paths: list[str], flag: str, text_column: Optional[str], seed: int,
                keep_linebreaks: bool = False) -> StreamCorpus:
    """The data files `paths` (sorted, of one format), each checked to hold the text column."""
    from trainer.data.arguments import DATA_FILE_EXTENSIONS

    kind = DATA_FILE_EXTENSIONS[os.path.splitext(paths[0])[1].lower()]
    column = stream_text_column(paths[0], kind, text_column)
    files = [stream_file(path, kind, column, flag) for path in paths]
    corpus = StreamCorpus(files, column, seed, flag, keep_linebreaks)
    require(corpus.size > 0, f"--{flag} {', '.join(paths[:3])}: no rows")
    return corpus


def dataset_splits(name: str, config_name: Optional[str]) -> dict[str, list[str]]:
    """--dataset_name under --streaming: the data files of each split of a local dataset directory or a Hub dataset
    (hf:// URLs), as datasets resolves them (its README's configs, or file names such as train-*.parquet,
    validation.jsonl). Offline, a Hub name fails at once (`check_loadable`)."""
    import datasets

    check_loadable(name, "dataset", "--dataset_name", cached_file="README.md", repo_type="dataset")
    try:
        builder = datasets.load_dataset_builder(name, config_name)
    except Exception as error:  # datasets raises many types for a directory it cannot make a dataset of
        raise UsageError(f"--dataset_name {name} is no dataset datasets can read: {type(error).__name__}: "
                         f"{str(error).splitlines()[0] if str(error) else ''}") from None
    splits = {str(split): sorted(files) for split, files in (builder.config.data_files or {}).items()}
    require("train" in splits, f"--dataset_name {name} has no 'train' split (splits: {', '.join(splits)})")
    for split in ("train", "validation"):
        check_split_format(name, split, splits.get(split, []))
    return splits


def check_split_format(name: str, split: str, files: list[str]) -> None:
    """A split's files are of one format the stream reads (seekable: no compressed or Arrow files)."""
    from trainer.data.arguments import DATA_FILE_EXTENSIONS

    extensions = sorted({os.path.splitext(path)[1].lower() for path in files})
    require(all(extension in DATA_FILE_EXTENSIONS for extension in extensions),
            f"--dataset_name {name}: its {split} files are {', '.join(extensions)}, and --streaming reads "
            f"{', '.join(DATA_FILE_EXTENSIONS)} files (uncompressed); drop --streaming, or convert the data")
    require(len({DATA_FILE_EXTENSIONS[extension] for extension in extensions}) <= 1,
            f"--dataset_name {name}: its {split} files mix formats ({', '.join(extensions)}); --streaming reads one "
            f"format per split")


def evaluation_blocks(stream: TrainStream, count: int):
    """The first `count` blocks of the validation stream (one lane, one pass), as a map-style Dataset."""
    import datasets

    blocks = []
    try:
        for block, _ in lane_blocks(stream, LaneId(0, 0, 0, 1), START, passes=1, seed=0):
            blocks.append(block)
            if len(blocks) == count:
                break
    except StreamEnded:  # fewer blocks than asked for: all of them
        pass
    except DataSourceFailed as failure:  # before training: bad input
        raise UsageError(str(failure)) from None
    require(bool(blocks), f"the evaluation text ({stream.corpus.files[0].path}) is too short for one block of "
                          f"{stream.block_size} tokens; give more validation text or smaller blocks")
    return datasets.Dataset.from_dict({name: [block[name].tolist() for block in blocks] for name in blocks[0]})


DEFAULT_EVAL_SAMPLES = 512


def open_corpora(data_args, files, seed: int, keep_linebreaks: bool = False):
    """(each training source's corpus, the primary's first; the validation corpus) of a job under --streaming: the
    training sources' files (--train_file's, or --dataset_name's train split, or --train_files'; then
    --replay_file's) and the validation files (--validation_file, or the dataset's validation split). Every source
    is read by the primary's text column. Opened before the tokenizer and the model: bad data fails in seconds."""
    from trainer.data.arguments import source_files

    splits = {}
    if files.train is not None:
        train_files, train_flag = source_files(files.train, "train_file"), "train_file"
    elif files.mixture:
        train_files, train_flag = files.mixture[0].files("train_files"), "train_files"
    else:
        splits = dataset_splits(data_args.dataset_name, data_args.dataset_config_name)
        train_files, train_flag = splits["train"], "dataset_name"
    if files.validation is not None:
        validation_files, validation_flag = source_files(files.validation, "validation_file"), "validation_file"
    else:
        require("validation" in splits, "--streaming evaluates on a fixed sample of validation text and there is "
                                        "none; give --validation_file (a file, directory or glob)")
        validation_files, validation_flag = splits["validation"], "dataset_name"
    train = open_corpus(train_files, train_flag, data_args.text_column, seed, keep_linebreaks)
    others = [open_corpus(source.files, source.flag, train.text_column, seed, keep_linebreaks)
              for source in files.other_sources()]
    validation = open_corpus(validation_files, validation_flag, train.text_column, seed, keep_linebreaks)
    return [train, *others], validation


def streamed_data(data_args, corpora, encode, block_size: int, one_per_document: bool):
    """(each training source's `TrainStream`, the primary's first; the evaluation Dataset) of the `open_corpora`:
    the training sources streamed, the first --max_eval_samples blocks (default DEFAULT_EVAL_SAMPLES) of the
    validation corpus tokenized now."""
    sources, validation = corpora
    window = data_args.shuffle_buffer_size
    evaluation = evaluation_blocks(TrainStream(validation, encode, block_size, one_per_document, window),
                                   data_args.max_eval_samples or DEFAULT_EVAL_SAMPLES)
    streams = [TrainStream(corpus, encode, block_size, one_per_document, window) for corpus in sources]
    return streams, evaluation


def streamed_texts_refused():
    """load_tokenizer's training texts under --streaming: there are none to train a tokenizer on up front."""
    raise UsageError("--streaming trains no tokenizer (that would read the whole stream first); give "
                     "--tokenizer_name or --model_name_or_path")


def passes_of(num_train_epochs: float) -> int:
    """How many times the lanes may read the data under --streaming: --num_train_epochs, rounded up."""
    return max(1, math.ceil(num_train_epochs))
