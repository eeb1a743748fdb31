"""--streaming (trainer.data.streaming): the lanes' partition and order, world-size independence, the seek of a
resume, loader workers; in-process with a character-code "tokenizer". URLs (memory://, fsspec's in-process file
system) read as their local files, down to an in-process job's parameters. The multi-process runs are in
test_streaming_runs.py."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

from trainer.data.streaming import (START, LaneId, StreamingBatches, TrainStream, dataset_splits, lane_blocks,
                                    open_corpus, rank_slots)
from trainer.data.arguments import source_files
from trainer.data.mixture import MixtureSource, mixture_counts, slot_sources
from trainer.errors import DataSourceFailed, UsageError


class CharacterCodes:
    """A stand-in tokenizer: each text's character codes, then 0 (an "EOS")."""

    def __call__(self, texts):
        return {"input_ids": [[ord(c) % 97 + 1 for c in text] + [0] for text in texts]}


def as_batch(batch):
    return batch


def documents(count: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    return [f"doc {i} " + "x" * int(rng.integers(1, 90)) for i in range(count)]


@pytest.fixture
def shards(tmp_path):
    """Three .txt shards of 40 documents each, with blank lines between some."""
    texts = documents(120)
    for shard in range(3):
        lines = []
        for text in texts[shard * 40:(shard + 1) * 40]:
            lines.append(text + "\n")
            if len(text) % 5 == 0:
                lines.append("\n")
        (tmp_path / f"part{shard}.txt").write_text("".join(lines))
    return str(tmp_path), texts


def corpus_of(pattern: str, text_column=None, seed: int = 3):
    return open_corpus(source_files(pattern, "train_file"), "train_file", text_column, seed)


def stream(pattern: str, window: int = 7, block_size: int = 16, seed: int = 3) -> TrainStream:
    return TrainStream(corpus_of(pattern, seed=seed), CharacterCodes(), block_size, False, window)


def test_every_lane_part_together_hold_every_document_once_per_pass(shards):
    directory, texts = shards
    corpus = stream(directory).corpus
    for epoch in (0, 1):
        for lanes in (1, 5, 16):
            read = []
            for lane in range(lanes):
                start, end = corpus.part(lane, lanes)
                got, _ = corpus.read(epoch, start, end, limit=10 ** 6)
                read.extend(got)
            assert sorted(read) == sorted(texts)
    first, second = (corpus.read(epoch, 0, corpus.size, 10 ** 6)[0] for epoch in (0, 1))
    assert first != second  # each pass lays the shards out in another order


def test_jsonl_and_parquet_shards_stream_the_same_documents_from_local_paths_and_urls(tmp_path):
    import fsspec
    import pyarrow as pa
    import pyarrow.parquet as pq

    texts = documents(30)
    (tmp_path / "j").mkdir()
    (tmp_path / "p").mkdir()
    for shard in range(2):
        part = texts[shard * 15:(shard + 1) * 15]
        (tmp_path / "j" / f"{shard}.jsonl").write_text("".join(json.dumps({"id": 1, "body": t}) + "\n" for t in part))
        pq.write_table(pa.table({"body": part}), tmp_path / "p" / f"{shard}.parquet", row_group_size=4)
    memory, root = fsspec.filesystem("memory"), f"/{tmp_path.name}"
    memory.put(str(tmp_path), root, recursive=True)
    try:  # the same files as memory:// URLs: a glob and a directory, listed and read through fsspec
        for pattern in ("j/*.jsonl", "p"):
            local, url = (corpus_of(f"{base}/{pattern}", "body", seed=0) for base in (tmp_path, f"memory://{root}"))
            read = [text for lane in range(4) for text in local.read(0, *local.part(lane, 4), 10 ** 6)[0]]
            assert sorted(read) == sorted(texts)
            assert [url.read(0, *url.part(lane, 4), 10 ** 6) for lane in range(4)] == [
                local.read(0, *local.part(lane, 4), 10 ** 6) for lane in range(4)]
    finally:
        memory.rm(root, recursive=True)
    with pytest.raises(UsageError, match="has no column 'text'"):
        corpus_of(str(tmp_path / "p"), "text", seed=0)
    with pytest.raises(UsageError, match="matches no file"):
        corpus_of(str(tmp_path / "none-*.jsonl"), seed=0)


def global_batches(source, per_device: int, world_size: int, accumulation: int, steps: int,
                   workers: int = 0, positions=None, sources=(MixtureSource("corpus"),)):
    """Each step's global batch (sample ids and tokens, by slot), composed from every rank's micro-batches.
    `source`: a TrainStream, or one per source of `sources` (a mixture)."""
    streams = source if isinstance(source, list) else [source]
    ranks = [StreamingBatches(streams, list(sources), as_batch, per_device, world_size, rank, accumulation, workers,
                              passes=3, seed=3) for rank in range(world_size)]
    for rank in ranks:
        if positions is not None:
            rank.load_state_dict(positions)
    iterators = [rank.micro_batches() for rank in ranks]
    batches = []
    for _ in range(steps):
        by_slot = {}
        for rank, iterator in zip(ranks, iterators):
            for slots in rank.micro_slots:
                batch = next(iterator)
                for slot, sample_id, row in zip(slots, batch["sample_id"], batch["input_ids"]):
                    by_slot[slot] = (int(sample_id), row.tolist())
            rank.advance()
        batches.append([by_slot[slot] for slot in sorted(by_slot)])
    for rank in ranks:
        rank.gather_across_ranks()  # single process: each rank's own lanes
    state = {**ranks[0].state_dict(),
             "lanes": {key: value for rank in ranks for key, value in rank.state_dict()["lanes"].items()
                       if int(key) in rank.own_slots}}
    return batches, state


def test_the_global_batches_are_the_same_at_every_world_size_and_worker_count(shards):
    source = stream(shards[0])
    one, _ = global_batches(source, 8, 1, 1, steps=6)
    assert one == global_batches(source, 4, 2, 1, steps=6)[0]
    assert one == global_batches(source, 2, 2, 2, steps=6)[0]
    assert one == global_batches(source, 8, 1, 1, steps=6, workers=2)[0]
    ids = [sample_id for batch in one for sample_id, _ in batch]
    assert len(set(ids)) == len(ids)  # masks are keyed by sample id: never one twice


def test_a_resume_continues_the_order_at_another_world_size(shards):
    source = stream(shards[0])
    expected, _ = global_batches(source, 8, 1, 1, steps=9)
    _, state = global_batches(source, 4, 2, 1, steps=4)
    assert global_batches(source, 2, 1, 4, steps=5, positions=state)[0] == expected[4:]


def test_a_lane_seeks_to_its_position_reading_one_window_not_the_consumed_data(shards):
    """Resumed from its position after block k, a lane yields exactly the blocks k+1.. of an uninterrupted one, and
    reads at most one shuffle window (plus what the next block needs) before the first."""
    source = stream(shards[0], window=5, block_size=32)
    lane = LaneId(slot=1, source=0, index=1, lanes=2)
    blocks = lane_blocks(source, lane, START, passes=3, seed=3)
    uninterrupted = [next(blocks) for _ in range(150)]  # into the second pass
    assert uninterrupted[-1][1][0] == 1
    for k in (3, 40, 120):
        fresh = stream(shards[0], window=5, block_size=32)
        resumed = lane_blocks(fresh, lane, uninterrupted[k][1], passes=3, seed=3)
        first = next(resumed)
        assert fresh.corpus.documents_read <= 5 + 5
        later = [first] + [next(resumed) for _ in range(150 - k - 2)]
        assert all(np.array_equal(a[0]["input_ids"], b[0]["input_ids"]) and a[1] == b[1]
                   for a, b in zip(later, uninterrupted[k + 1:]))


def test_a_stream_that_runs_out_of_passes_stops(shards):
    source = stream(shards[0], block_size=64)
    blocks = lane_blocks(source, LaneId(0, 0, 0, 1), START, passes=1, seed=3)
    with pytest.raises(DataSourceFailed, match=r"ended after 1 pass\(es\) \(--num_train_epochs\) before --max_steps"):
        for _ in range(10 ** 4):
            next(blocks)


def test_a_corrupt_line_mid_stream_names_the_file(tmp_path):
    good = "".join(f"{json.dumps({'text': t})}\n" for t in documents(20))
    (tmp_path / "a.jsonl").write_text(good)
    (tmp_path / "b.jsonl").write_text(good + '{"text": "cut off\n')
    source = stream(str(tmp_path), block_size=8)
    with pytest.raises(DataSourceFailed, match=r"b\.jsonl \(byte \d+\) could not be read: JSONDecodeError"):
        blocks = lane_blocks(source, LaneId(0, 0, 0, 1), START, passes=1, seed=3)
        for _ in range(10 ** 4):
            next(blocks)


def test_rank_slots_are_the_global_batch_samplers_layout():
    assert rank_slots(2, 2, 1, 2) == [[2, 3], [6, 7]]


def test_a_dataset_split_of_compressed_files_is_refused_by_name(tmp_path):
    """--dataset_name's files are datasets' resolution (here of a local directory; hf:// URLs for a Hub name): the
    stream seeks in them, which it cannot in a compressed file."""
    import gzip

    with gzip.open(tmp_path / "train.jsonl.gz", "wt") as handle:
        handle.write(json.dumps({"text": "a few words"}) + "\n")
    (tmp_path / "validation.jsonl").write_text(json.dumps({"text": "a few words"}) + "\n")
    with pytest.raises(UsageError, match=r"its train files are \.gz, and --streaming reads .* \(uncompressed\)"):
        dataset_splits(str(tmp_path), None)


# ---------------------------------------------------------------------------------------------------- mixtures
MIXTURE = [MixtureSource("corpus", 3.0), MixtureSource("other", 1.0)]  # a global batch of 8: 6 and 2 sequences
X, Q = ord("x") % 97 + 1, ord("q") % 97 + 1  # every block of the corpus holds an x; the other source is all q


@pytest.fixture
def other_source(tmp_path_factory):
    """A second source of 12 documents of q's (6 lines each in 2 .jsonl files): a few blocks of 16 per lane and
    pass."""
    directory = tmp_path_factory.mktemp("other")
    for shard in range(2):
        (directory / f"{shard}.jsonl").write_text("".join(json.dumps({"text": "q" * (5 + shard + i)}) + "\n"
                                                          for i in range(6)))
    return str(directory)


def test_a_streamed_mixture_holds_each_sources_count_in_its_slots_at_every_world_size(shards, other_source):
    """Source i's blocks fill exactly the slots mixture.slot_sources gives it, every step; the steps are the same
    at any world size, accumulation and worker count; the other source cycles past the primary's pass limit; the
    figures are each source's blocks and tokens."""
    streams = [stream(shards[0]), stream(other_source)]
    one, state = global_batches(streams, 8, 1, 1, steps=30, sources=MIXTURE)
    owners = slot_sources(mixture_counts(MIXTURE, 8)).tolist()
    assert owners.count(1) == 2
    for batch in one:
        for owner, (_, row) in zip(owners, batch):
            assert X in row and Q not in row if owner == 0 else set(row) == {Q, 0}
    assert one == global_batches(streams, 2, 2, 2, steps=30, sources=MIXTURE)[0]
    assert one == global_batches(streams, 4, 1, 2, steps=30, workers=2, sources=MIXTURE)[0]
    passes = {slot: position[0] for slot, position in state["lanes"].items()}
    assert max(passes[str(slot)] for slot, owner in enumerate(owners) if owner == 1) >= 3  # passes=3: primary only
    data = StreamingBatches(streams, MIXTURE, as_batch, 8, 1, 0, 1, 0, passes=3, seed=3)
    data.load_state_dict(state)
    assert data.consumed() == {"train_samples_per_source": {"corpus": 6 * 30, "other": 2 * 30},
                               "train_tokens_per_source": {"corpus": 6 * 30 * 16, "other": 2 * 30 * 16}}


def test_line_by_line_each_sources_tokens_are_those_of_its_blocks(shards, other_source):
    """Ragged blocks (one per document): a source's tokens are its blocks' unpadded lengths, as map-style counts."""
    streams = [TrainStream(corpus_of(pattern), CharacterCodes(), 16, True, 7) for pattern in (shards[0], other_source)]
    batches, state = global_batches(streams, 4, 2, 1, steps=5, sources=MIXTURE)
    owners = slot_sources(mixture_counts(MIXTURE, 8)).tolist()
    data = StreamingBatches(streams, MIXTURE, as_batch, 8, 1, 0, 1, 0, passes=3, seed=3)
    data.load_state_dict(state)
    assert data.consumed()["train_tokens_per_source"] == {
        name: sum(len(row) for batch in batches for owner, (_, row) in zip(owners, batch) if owner == source)
        for source, name in enumerate(["corpus", "other"])}


def test_a_streamed_mixture_resumes_at_another_world_size_and_only_with_its_own_counts(shards, other_source):
    streams = [stream(shards[0]), stream(other_source)]
    expected, _ = global_batches(streams, 8, 1, 1, steps=12, sources=MIXTURE)
    _, state = global_batches(streams, 4, 2, 1, steps=5, sources=MIXTURE)
    assert state["counts"] == [6, 2]
    assert global_batches(streams, 2, 1, 4, steps=7, positions=state, sources=MIXTURE)[0] == expected[5:]
    reweighted = [MixtureSource("corpus", 1.0), MixtureSource("other", 1.0)]
    with pytest.raises(UsageError, match=r"streamed \[6, 2\] sequences of each training source per step and this "
                                         r"run's sources .* give \[4, 4\]"):
        global_batches(streams, 8, 1, 1, steps=1, positions=state, sources=reweighted)
    older = {**state, "lanes": {slot: position[:5] for slot, position in state["lanes"].items()}}  # no tokens
    with pytest.raises(UsageError, match="predate per-source token counts"):
        global_batches(streams, 8, 1, 1, steps=1, positions=older, sources=MIXTURE)


def test_a_cycling_lane_that_finds_no_text_in_its_part_stops_instead_of_looking_forever(tmp_path):
    (tmp_path / "tiny.txt").write_text("one short line\n")
    blocks = lane_blocks(stream(str(tmp_path / "tiny.txt")), LaneId(3, 1, 3, 4), START, passes=None, seed=3)
    with pytest.raises(DataSourceFailed, match=r"tiny\.txt: lane 3 of its 4 .* finds no text in its 1/4 of the data"):
        next(blocks)


# -------------------------------------------------------------------------------------------------------------- URLs
@pytest.fixture
def local_and_memory_data(corpus, tmp_path):
    """The same files twice: local paths and memory:// URLs (fsspec's file system inside this process), each
    {"shards": a directory of two .jsonl files, "other": a .parquet file, "validation": a .txt file}."""
    import fsspec
    import pyarrow as pa
    import pyarrow.parquet as pq

    lines = open(corpus["train"]).read().splitlines()[:600]
    local = tmp_path / "data"
    (local / "shards").mkdir(parents=True)
    for shard in range(2):
        (local / "shards" / f"{shard}.jsonl").write_text("".join(json.dumps({"text": line}) + "\n"
                                                                 for line in lines[shard:400:2]))
    pq.write_table(pa.table({"text": lines[400:]}), local / "other.parquet", row_group_size=50)
    (local / "validation.txt").write_text(open(corpus["validation"]).read())
    memory, root = fsspec.filesystem("memory"), f"/{tmp_path.name}"
    memory.put(str(local), root, recursive=True)
    names = {"shards": "shards", "other": "other.parquet", "validation": "validation.txt"}
    yield ({key: str(local / name) for key, name in names.items()},
           {key: f"memory://{root}/{name}" for key, name in names.items()})
    memory.rm(root, recursive=True)


@pytest.mark.slow  # three short in-process runs: 12-23 s on 2 shared cores
def test_a_stream_of_urls_trains_as_its_local_files_and_resumes_bit_identical(local_and_memory_data, tokenizer_dir,
                                                                              in_process_job, tmp_path):
    """A mixture of memory:// URLs (a directory of .jsonl shards, weight 3, and a .parquet file, weight 1; a .txt
    validation file), stopped in step 2 and resumed, ends bit-identical to the same run over the local paths, with
    the same per-source figures."""
    from conftest import TINY_BERT, read_results
    from resume_helpers import assert_same_run, logged_losses
    from trainer.mlm import main

    def args(files, out):
        return ["--streaming", "--train_files", f"{files['shards']}:3", f"{files['other']}:1", "--validation_file",
                files["validation"], "--tokenizer_name", tokenizer_dir, *TINY_BERT, "--max_seq_length", "32",
                "--output_dir", str(out), "--learning_rate", "5e-3", "--logging_steps", "1", "--report_to", "none",
                "--probe_sentences", "", "--max_eval_samples", "8", "--per_device_train_batch_size", "4",
                "--gradient_accumulation_steps", "2", "--max_steps", "4", "--save_steps", "2",
                "--shuffle_buffer_size", "16", "--peak_tflops", "1"]

    local, memory = local_and_memory_data
    expected, out = tmp_path / "local", tmp_path / "memory"
    in_process_job(main, args(local, expected))
    in_process_job(main, args(memory, out), TRAINER_FAULT_SIGNAL_AT_MICRO_BATCH=3)
    assert os.path.isdir(out / "checkpoint-2") and not os.path.exists(out / "model.safetensors")
    in_process_job(main, args(memory, out))
    assert_same_run(expected, out, steps=4)
    assert len(logged_losses(out)) > 4
    for figure in ("train_samples_per_source", "train_tokens_per_source"):
        assert read_results(out)[figure] == {memory[key]: read_results(expected)[figure][local[key]]
                                             for key in ("shards", "other")}
