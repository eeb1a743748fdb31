"""Raw text -> the sequences a job trains on, defined once per job (`Tokenization`, the job's `JobSpec.tokenization`)
and run by the job itself and by `python -m trainer.prepare` alike.

Two stages: the job's `tokenize` (text rows -> token rows; any split of the rows gives the same token rows), then,
when the job concatenates, `group_into_blocks` (token rows -> blocks cut from consecutive CHUNK_ROWS-row batches).
Because the batches count from the start of the split, prepare can tokenize and cut its processes' parts apart
and still write exactly the job's blocks. Classification does not concatenate: one row per example.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from trainer.data.arguments import DataFiles
from trainer.data.loading import (check_text_column, group_into_blocks, load_source, load_text_splits,
                                  other_source_splits, source_split)
from trainer.data.prepared import SPLITS, PreparedData, is_prepared_directory
from trainer.data.streaming import open_corpora, streamed_data, streamed_texts_refused
from trainer.errors import require
from trainer.models.loading import check_sequence_length, load_tokenizer


class Tokenization:
    """How a job makes its sequences from text. A job subclasses it and sets the job-specific parts."""

    job = ""  # the job's name: mlm, clm, classify (trainer.<job>)
    length_flag = "--max_seq_length"  # the flag that sets the sequence length
    new_tokenizer = None  # trains a tokenizer when none is named (`load_tokenizer`'s train_new; None: WordPiece)
    model_preset = None  # the job's model preset from scratch (`load_model`'s preset; None: tiny BERT)

    def encoder(self, config, tokenizer):
        """The job's picklable texts -> token columns function (one row per non-empty text), run by `tokenize`
        and, under --streaming, in the loader workers (trainer.data.streaming)."""
        raise NotImplementedError

    def read_text(self, config, files: DataFiles):
        """(the "train" and "validation" text splits (and the other training sources'), the job's `inputs`: what it
        reads of a row, which `tokenize` takes; a language-model job's is its text column)."""
        return load_text_splits(config.data, files, keep_linebreaks=self.keep_linebreaks(config))

    def training_texts(self, raw, inputs) -> list[str]:
        """The texts a new tokenizer is trained on when none is named."""
        return raw["train"][inputs]

    def text_tokenizer(self, config, raw, inputs):
        """The tokenizer named (or the model's), else one trained on the training texts; checked for the job."""
        tokenizer = load_tokenizer(config.model, lambda: self.training_texts(raw, inputs), self.new_tokenizer)
        self.check_tokenizer(config, tokenizer)
        return tokenizer

    def manifest_inputs(self, inputs) -> dict:
        """What a prepared directory's manifest records of `inputs` (trainer.prepare)."""
        return {"text_column": inputs}

    def tokenize(self, config, raw, text_column: str, tokenizer):
        """A DatasetDict of text rows -> the same splits as token rows (one per non-empty text)."""
        import datasets

        encode, data_args = self.encoder(config, tokenizer), config.data
        return datasets.DatasetDict({
            split: dataset.map(lambda batch: encode(batch[text_column]), batched=True,
                               num_proc=data_args.preprocessing_num_workers, remove_columns=dataset.column_names,
                               desc="tokenize", load_from_cache_file=not data_args.overwrite_cache)
            for split, dataset in raw.items()})

    def concatenates(self, config) -> bool:
        """Whether the token rows are concatenated and cut into blocks of the sequence length."""
        return True

    def sequence_length(self, config, model_config, prepared_length: int | None = None) -> int:
        """The tokens per sequence; `prepared_length`: that of a prepared --train_file, for a job whose length
        is unset by default."""
        return config.data.max_seq_length

    def token_options(self, config) -> dict:
        """The job's options, by flag name, that change the sequences besides the tokenizer and the length."""
        return {}

    def keep_linebreaks(self, config) -> bool:
        return False

    def check_tokenizer(self, config, tokenizer) -> None:
        """Refuse a tokenizer the job cannot use (e.g. one without a mask token for masked LM)."""

    def sequences(self, config, raw, text_column: str, tokenizer, length: int):
        """Raw splits -> the tokenized (and chunked) splits the job trains on."""
        tokenized = self.tokenize(config, raw, text_column, tokenizer)
        return group_into_blocks(tokenized, length, config.data) if self.concatenates(config) else tokenized


@dataclass
class JobData:
    """What a language-model job's task is built from: the tokenizer, the model, the sequence length, and the
    "train", "validation" (and with --replay_file "replay") splits of sequences."""

    tokenizer: object
    model: object
    length: int
    splits: dict  # under --streaming: "validation" alone
    # Under --streaming: each training source's `TrainStream` (trainer.data.streaming), the primary first.
    streams: list = field(default_factory=list)

    @property
    def stream(self):
        """The primary training source's stream under --streaming; None otherwise."""
        return self.streams[0] if self.streams else None

    def other_sources(self, files: DataFiles) -> list:
        """The training sources after the primary, for `Task.other_sources`: their streams, or their prepared
        splits (`other_source_splits`)."""
        return self.streams[1:] if self.streams else other_source_splits(self.splits, files)


def job_data(config, files: DataFiles, tokenization: Tokenization, build_model) -> JobData:
    """The job's data from raw text (tokenized here) or from a prepared --train_file directory (opened as it is);
    `build_model(tokenizer)` builds the job's model once the tokenizer is known."""
    if is_prepared_directory(files.train):
        return prepared_job_data(config, files, tokenization, build_model)
    if config.data.streaming:
        return streamed_job_data(config, files, tokenization, build_model)
    raw, text_column = tokenization.read_text(config, files)
    tokenizer = tokenization.text_tokenizer(config, raw, text_column)
    model = build_model(tokenizer)
    length = tokenization.sequence_length(config, model.config)
    check_sequence_length(length, model.config, tokenization.length_flag)
    return JobData(tokenizer, model, length, tokenization.sequences(config, raw, text_column, tokenizer, length))


def streamed_job_data(config, files: DataFiles, tokenization: Tokenization, build_model) -> JobData:
    """--streaming: nothing tokenized up front but the fixed evaluation sample; the training stream encodes as
    training goes."""
    corpora = open_corpora(config.data, files, config.optimization.seed, tokenization.keep_linebreaks(config))
    tokenizer = load_tokenizer(config.model, streamed_texts_refused, tokenization.new_tokenizer)
    tokenization.check_tokenizer(config, tokenizer)
    model = build_model(tokenizer)
    length = tokenization.sequence_length(config, model.config)
    check_sequence_length(length, model.config, tokenization.length_flag)
    streams, evaluation = streamed_data(config.data, corpora, tokenization.encoder(config, tokenizer), length,
                                        not tokenization.concatenates(config))
    return JobData(tokenizer, model, length, {"validation": evaluation}, streams)


def prepared_job_data(config, files: DataFiles, tokenization: Tokenization, build_model) -> JobData:
    """The splits of a prepared directory, checked against the job: its job, tokenizer, length and options."""
    prepared, tokenizer = open_prepared(config, files, tokenization)
    model = build_model(tokenizer)
    length, splits = prepared_sequences(config, tokenization, prepared, model.config)
    splits.update(other_source_sequences(config, files, tokenization, prepared, tokenizer, length))
    return JobData(tokenizer, model, length, splits)


def open_prepared(config, files: DataFiles, tokenization: Tokenization) -> tuple[PreparedData, object]:
    """(the prepared --train_file directory, checked to be for this job, alone, and made with the job's options that
    change the sequences, its tokenizer (`prepared_tokenizer`), checked for the job)."""
    prepared = PreparedData.open(files.train)
    prepared.check_job(tokenization.job)
    require(not files.validation, f"--train_file {files.train} is prepared and holds its validation split; drop "
                                  f"--validation_file (or prepare the data with it)")
    prepared.check_token_options(tokenization.token_options(config))
    tokenizer = prepared_tokenizer(config.model, prepared)
    tokenization.check_tokenizer(config, tokenizer)
    return prepared, tokenizer


def prepared_sequences(config, tokenization: Tokenization, prepared: PreparedData, model_config) -> tuple[int, dict]:
    """(the sequence length, checked against the directory and the model, {split: its sequences, memory-mapped})."""
    length = tokenization.sequence_length(config, model_config, prepared.manifest["sequence_length"])
    prepared.check_sequence_length(length)
    check_sequence_length(length, model_config, tokenization.length_flag)
    return length, {split: prepared.split(split) for split in SPLITS}


def other_source_sequences(config, files: DataFiles, tokenization: Tokenization, prepared: PreparedData, tokenizer,
                           length: int) -> dict:
    """The training sources after the primary (--replay_file) beside prepared training data are text: made into
    sequences as the prepared ones were, one split each (see trainer.data.loading.load_text_splits)."""
    import datasets

    text_column = prepared.manifest["text_column"]
    raw = {}
    for index, source in enumerate(files.other_sources(), start=1):
        dataset = load_source(source, tokenization.keep_linebreaks(config))
        check_text_column(dataset, text_column, str(source))
        raw[source_split(index)] = dataset.select_columns([text_column])
    if not raw:
        return {}
    return dict(tokenization.sequences(config, datasets.DatasetDict(raw), text_column, tokenizer, length))


def prepared_tokenizer(model_args, prepared: PreparedData):
    """The tokenizer named (--tokenizer_name, else the model's), checked to be the one the data was prepared with;
    with none named, the one saved in the directory."""
    from transformers import AutoTokenizer

    name = model_args.tokenizer_name or model_args.model_name_or_path
    if not name:
        return AutoTokenizer.from_pretrained(prepared.directory)
    tokenizer = load_tokenizer(model_args, training_texts=None)
    prepared.check_tokenizer(tokenizer, "--tokenizer_name" if model_args.tokenizer_name else "--model_name_or_path",
                             name)
    return tokenizer
