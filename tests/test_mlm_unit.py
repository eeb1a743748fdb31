"""Chunking, masking statistics, whole-word masking and the fixed evaluation masks."""
from types import SimpleNamespace

import datasets
import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

from trainer.data.samplers import GlobalBatchSampler, shard_for_evaluation
from trainer.data.streaming import joined
from trainer.mlm import MLM_TOKENIZATION, EvalCollator, MLMArguments, Masker, TrainCollator, mask_evaluation_set
from trainer.models.sparse_mlm import IGNORE

MASK_ID, VOCAB = 4, 1000


def chunked(tokenizer_dir, texts, length, **mlm):
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    raw = datasets.DatasetDict({split: datasets.Dataset.from_dict({"text": texts}) for split in ("train", "validation")})
    data_args = SimpleNamespace(max_seq_length=length, preprocessing_num_workers=None, overwrite_cache=True)
    config = SimpleNamespace(data=data_args, mlm=MLMArguments(**mlm))
    return tokenizer, MLM_TOKENIZATION.sequences(config, raw, "text", tokenizer, length)["train"]


def test_chunking_concatenates_in_order_and_drops_only_the_remainder(tokenizer_dir):
    texts = [f"the movie number {i} was great ." for i in range(50)] + ["", "   "]
    tokenizer, blocks = chunked(tokenizer_dir, texts, 16)
    stream = [t for text in texts if text.strip() for t in tokenizer(text)["input_ids"]]
    flat = [t for block in blocks["input_ids"] for t in block]
    assert all(len(block) == 16 for block in blocks["input_ids"])
    assert flat == stream[:len(flat)] and len(stream) - len(flat) < 16
    assert blocks["special_tokens_mask"][0][0] == 1  # [CLS] marked special, never masked


def test_line_by_line_keeps_lines_separate_and_truncates(tokenizer_dir):
    texts = ["the movie .", "a much longer line about a film with many many many words in it ."]
    tokenizer, rows = chunked(tokenizer_dir, texts, 8, line_by_line=True)
    assert [len(r) for r in rows["input_ids"]] == [len(tokenizer(texts[0])["input_ids"]), 8]


def test_bert_masking_statistics_and_special_tokens():
    rng = np.random.default_rng(0)
    ids = rng.integers(10, VOCAB, size=(400, 128))
    special = np.zeros_like(ids)
    special[:, 0] = special[:, -1] = 1
    inputs, labels = Masker(0.15, VOCAB, MASK_ID, seed=3)(ids, special, range(400), epoch=0, stream=0)
    masked = labels != IGNORE
    assert not masked[:, 0].any() and not masked[:, -1].any()
    assert masked[:, 1:-1].mean() == pytest.approx(0.15, abs=0.005)
    assert (labels[masked] == ids[masked]).all()
    became_mask = (inputs == MASK_ID) & masked
    unchanged = (inputs == ids) & masked
    random = masked & ~became_mask & ~unchanged
    assert became_mask.sum() / masked.sum() == pytest.approx(0.8, abs=0.02)
    assert unchanged.sum() / masked.sum() == pytest.approx(0.1, abs=0.02)  # (+ ~0.1% random draws of the same id)
    assert random.sum() / masked.sum() == pytest.approx(0.1, abs=0.02)
    assert (inputs[~masked] == ids[~masked]).all()


def test_masks_depend_on_sample_and_epoch_only_not_on_batch_composition():
    ids = np.arange(10 * 64).reshape(10, 64) % 900 + 10
    special = np.zeros_like(ids)
    masker = Masker(0.15, VOCAB, MASK_ID, seed=1)
    whole, _ = masker(ids, special, range(10), epoch=2, stream=0)
    part, _ = masker(ids[[7, 3]], special[[7, 3]], [7, 3], epoch=2, stream=0)
    assert (part == whole[[7, 3]]).all()
    other_epoch, _ = masker(ids, special, range(10), epoch=3, stream=0)
    assert (other_epoch != whole).any()


def test_a_line_by_line_sample_is_masked_the_same_whatever_the_batch_width_it_is_padded_to():
    collate = TrainCollator(Masker(0.5, VOCAB, MASK_ID, seed=1), pad_token_id=0, padded=True)
    short = list(range(10, 74))

    def masked_row(rows):
        batch = {"input_ids": rows, "special_tokens_mask": [[0] * len(row) for row in rows],
                 "sample_id": np.arange(len(rows)), "epoch": 0}
        return collate(batch)["input_ids"][0, :len(short)]

    alone, beside_a_long_row = masked_row([short]), masked_row([short, list(range(10, 210))])
    assert (alone != torch.as_tensor(short)).any()  # some position masked
    assert torch.equal(alone, beside_a_long_row)


@pytest.mark.parametrize("ragged", [False, True])
def test_masks_drawn_in_parts_of_a_batch_assemble_to_the_whole_batchs(ragged):
    """--streaming's loader workers mask their parts of a micro-batch (`rows`), the main process assembles it:
    the same tensors as the batch collated in one call, blocks or ragged lines, whole-word masks included."""
    rng = np.random.default_rng(0)
    lengths = rng.integers(3, 30, 6) if ragged else [24] * 6
    ids = [rng.integers(10, VOCAB, n) for n in lengths]
    starts = [(rng.random(n) < 0.6).astype(np.int64) for n in lengths]

    def batch(samples):
        columns = {"input_ids": [ids[i] for i in samples], "word_start": [starts[i] for i in samples],
                   "special_tokens_mask": [np.zeros(lengths[i], np.int64) for i in samples]}
        columns = columns if ragged else {name: np.stack(rows) for name, rows in columns.items()}
        return {**columns, "sample_id": np.asarray(samples) + 100, "epoch": 0}

    collate = TrainCollator(Masker(0.4, VOCAB, MASK_ID, seed=1, whole_word=True), pad_token_id=0, padded=ragged)
    whole = collate(batch([0, 1, 2, 3, 4, 5]))
    parts = collate.assemble(joined([collate.rows(batch([0, 1])), collate.rows(batch([2, 3, 4, 5]))]))
    assert whole.keys() == parts.keys() and whole["num_loss_items"] > 0
    assert all(torch.equal(whole[name], parts[name]) if torch.is_tensor(whole[name]) else whole[name] == parts[name]
               for name in whole)


def test_whole_word_masking_masks_all_pieces_of_a_word_together(tokenizer_dir):
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    texts = ["unbelievably overwhelming cinematography and breathtaking performances ."] * 200
    encoded = tokenizer(texts, return_special_tokens_mask=True)
    from trainer.mlm import word_starts

    starts = np.array([word_starts(encoded.word_ids(i)) for i in range(len(texts))])
    ids, special = np.array(encoded["input_ids"]), np.array(encoded["special_tokens_mask"])
    assert (starts.sum(axis=1) < (special == 0).sum(axis=1)).all(), "test needs words split into pieces"
    _, labels = Masker(0.3, VOCAB, MASK_ID, seed=0, whole_word=True)(ids, special, range(200), 0, 0, starts)
    word_of = np.cumsum(starts, axis=1)
    masked = labels != IGNORE
    for row in range(200):
        for word in np.unique(word_of[row][special[row] == 0]):
            pieces = masked[row][(word_of[row] == word) & (special[row] == 0)]
            assert pieces.all() or not pieces.any()
    assert 0.2 < masked[special == 0].mean() < 0.4


def test_evaluation_masks_are_drawn_once_and_fixed(tokenizer_dir):
    tokenizer, blocks = chunked(tokenizer_dir, [f"film {i} was a waste of time ." for i in range(100)], 16)
    masker = Masker(0.15, len(tokenizer), tokenizer.mask_token_id, seed=0)
    first = mask_evaluation_set(blocks, masker, tokenizer.pad_token_id)
    again = mask_evaluation_set(blocks, masker, tokenizer.pad_token_id)
    assert first["input_ids"] == again["input_ids"] and first["labels"] == again["labels"]
    collate = EvalCollator(tokenizer.pad_token_id, padded=False)
    rows = first.with_format("numpy")[[0, 1, 2]]
    batch = collate({**rows, "sample_id": np.array([0, 1, 2])})
    assert batch["num_loss_items"] == int((np.array(rows["labels"]) != IGNORE).sum())
    real = batch["masked_labels"][:batch["num_loss_items"]]
    assert real.tolist() == [l for row in rows["labels"] for l in row if l != IGNORE]
    # Padded to a multiple of 64 rows (few distinct shapes) with rows that carry no loss.
    assert len(batch["masked_labels"]) % 64 == 0 and len(batch["masked_positions"]) == len(batch["masked_labels"])
    assert (batch["masked_labels"][batch["num_loss_items"]:] == IGNORE).all()


def test_train_collator_pads_ragged_lines_and_flags_padding_special():
    collate = TrainCollator(Masker(0.5, VOCAB, MASK_ID, seed=0), pad_token_id=0, padded=True)
    rows = np.empty(2, dtype=object)
    rows[0], rows[1] = np.array([2, 50, 51, 3]), np.array([2, 60, 3])
    special = np.empty(2, dtype=object)
    special[0], special[1] = np.array([1, 0, 0, 1]), np.array([1, 0, 1])
    batch = collate({"input_ids": rows, "special_tokens_mask": special, "sample_id": np.array([0, 1]), "epoch": 0})
    assert batch["input_ids"].shape == (2, 8)
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 0, 0, 0, 0], [1, 1, 1, 0, 0, 0, 0, 0]]
    flat_positions = set(batch["masked_positions"][:batch["num_loss_items"]].tolist())
    assert flat_positions <= {1, 2, 9}


def test_global_batch_sampler_same_samples_per_step_at_every_world_size():
    def step_sets(world, micro, accumulation):
        per_rank = [list(GlobalBatchSampler(100, micro, world, r, accumulation, seed=5)) for r in range(world)]
        steps = []
        for step in range(100 // (micro * world * accumulation)):
            window = slice(step * accumulation, (step + 1) * accumulation)
            steps.append(sorted(i for rank in per_rank for batch in rank[window] for i in batch))
        return steps

    reference = step_sets(1, 16, 1)
    assert step_sets(2, 4, 2) == reference == step_sets(1, 8, 2) == step_sets(4, 2, 2)
    seen = [i for step in reference for i in step]
    assert len(seen) == len(set(seen)) == 96  # disjoint; the incomplete last global batch is dropped


def test_evaluation_shards_cover_every_sample_once():
    for size, world in ((10, 3), (2, 4), (97, 2)):
        covered = [i for r in range(world) for i in shard_for_evaluation(size, world, r)]
        assert covered == list(range(size))


def test_unigram_baseline_by_value_on_a_hand_made_corpus():
    from trainer.mlm import unigram_perplexity

    # Training tokens (special ones excluded): 10 twice, 11 once. Vocabulary 20: add-one counts sum to 3 + 20.
    train = datasets.Dataset.from_dict({"input_ids": [[2, 10, 11, 3], [2, 10, 3], [2, 12, 12, 3]],
                                        "special_tokens_mask": [[1, 0, 0, 1], [1, 0, 1], [1, 0, 0, 1]]})
    evaluation = datasets.Dataset.from_dict({"labels": [[IGNORE, 10, IGNORE], [12, IGNORE]]})
    # The first two rows only (a `select`, as --max_train_samples makes): P(10) = 3/23, P(12) = 1/23.
    expected = np.exp(-(np.log(3 / 23) + np.log(1 / 23)) / 2)
    assert unigram_perplexity(train.select([0, 1]), evaluation, vocab_size=20) == pytest.approx(expected, rel=1e-12)
    # All rows: 12 seen twice, the total is 5 + 20.
    expected = np.exp(-(np.log(3 / 25) + np.log(3 / 25)) / 2)
    assert unigram_perplexity(train, evaluation, vocab_size=20) == pytest.approx(expected, rel=1e-12)
