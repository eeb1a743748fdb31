import json
from collections import Counter
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, BertForMaskedLM

from trainer.data.demo import (FLIPPED_TO_NEGATIVE, FLIPPED_TO_POSITIVE, generate_reviews, tiny_bert_config,
                               train_wordpiece_tokenizer, write_mlm_corpus, write_product_sentiment_dataset,
                               write_sentiment_dataset)

LABELS = {"positive", "negative"}


def _num_sentences(text: str) -> int:
    return sum(token in {".", "!"} for token in text.split())


def _read_jsonl(path: str) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_mlm_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def trained(corpus, tmp_path_factory):
    """A tokenizer trained on the default corpus and the directory it was saved to."""
    directory = tmp_path_factory.mktemp("tokenizer")
    tokenizer = train_wordpiece_tokenizer(list(corpus), vocab_size=1000, output_dir=str(directory))
    return tokenizer, directory


def test_generate_reviews_is_deterministic():
    assert generate_reviews(300, seed=7) == generate_reviews(300, seed=7)
    assert generate_reviews(300, seed=7) != generate_reviews(300, seed=8)


def test_generate_reviews_shape_and_balance():
    reviews = generate_reviews(1001, seed=3)
    assert len(reviews) == 1001
    counts = Counter(review["label"] for review in reviews)
    assert set(counts) == LABELS
    assert counts["positive"] - counts["negative"] == 1
    for review in reviews:
        text = review["text"]
        assert text == text.lower() == text.strip()
        assert 1 <= _num_sentences(text) <= 4


def test_mlm_corpus_sizes_and_determinism(corpus, tmp_path):
    train, validation = corpus
    train_bytes, validation_bytes = Path(train).read_bytes(), Path(validation).read_bytes()
    assert Path(train).name == "train.txt" and Path(validation).name == "validation.txt"
    assert len(train_bytes) >= 1_000_000
    assert 0.03 < len(validation_bytes) / len(train_bytes) < 0.08
    assert len(train_bytes.splitlines()) >= 10_000
    assert all(train_bytes.splitlines())
    again = write_mlm_corpus(tmp_path)
    assert Path(again[0]).read_bytes() == train_bytes
    assert Path(again[1]).read_bytes() == validation_bytes


def test_sentiment_dataset(tmp_path):
    train, validation = write_sentiment_dataset(tmp_path / "a")
    for path, size in ((train, 4000), (validation, 500)):
        records = _read_jsonl(path)
        assert len(records) == size
        assert all(set(record) == {"sentence", "label"} for record in records)
        labels = Counter(record["label"] for record in records)
        assert labels == {"positive": size // 2, "negative": size // 2}
        assert all(1 <= _num_sentences(record["sentence"]) <= 2 for record in records)
    assert _read_jsonl(train)[:500] != _read_jsonl(validation)
    again = write_sentiment_dataset(tmp_path / "b")
    for path, original in zip(again, (train, validation)):
        assert Path(path).read_bytes() == Path(original).read_bytes()


def test_product_sentiment_dataset_is_a_second_domain_with_flipped_cue_words(tmp_path):
    movies = [_read_jsonl(path) for path in write_sentiment_dataset(tmp_path / "movies")]
    train, validation = write_product_sentiment_dataset(tmp_path / "products")
    products = [_read_jsonl(train), _read_jsonl(validation)]
    for records, size in zip(products, (4000, 500)):  # the movie task's files, sizes, columns and balance
        assert len(records) == size
        assert all(set(record) == {"sentence", "label"} for record in records)
        assert Counter(record["label"] for record in records) == {"positive": size // 2, "negative": size // 2}
        assert all(1 <= _num_sentences(record["sentence"]) <= 2 for record in records)
    again = write_product_sentiment_dataset(tmp_path / "again")
    assert [Path(p).read_bytes() for p in again] == [Path(train).read_bytes(), Path(validation).read_bytes()]
    # The domains can be told apart: every product review has a word that no movie review has.
    movie_words = {word for split in movies for record in split for word in record["sentence"].split()}
    assert all(set(record["sentence"].split()) - movie_words for split in products for record in split)

    def polarity_share(records, words, label):
        """Among the reviews holding one of `words`, the share labelled `label`."""
        found = [record["label"] for record in records if set(record["sentence"].split()) & set(words)]
        return len(found), sum(found_label == label for found_label in found) / len(found)

    # The flipped cue words: common in both domains, with opposite polarities (noise: "never dull" and the like).
    for words, movie_label, product_label in ((FLIPPED_TO_POSITIVE, "negative", "positive"),
                                              (FLIPPED_TO_NEGATIVE, "positive", "negative")):
        for records, label in ((movies[0], movie_label), (products[0], product_label)):
            count, share = polarity_share(records, words, label)
            assert count > 300 and share > 0.9, (words, label, count, share)
    with pytest.raises(ValueError, match="unknown review domain"):
        generate_reviews(2, domain="books")


def test_tokenizer_vocab_size_and_determinism(corpus):
    first = train_wordpiece_tokenizer(list(corpus), vocab_size=1000)
    second = train_wordpiece_tokenizer(list(corpus), vocab_size=1000)
    assert 950 <= len(first) <= 1000
    assert first.get_vocab() == second.get_vocab()
    # The small synthetic corpus cannot fill a large vocabulary, but it must not overflow it.
    assert 1500 <= len(train_wordpiece_tokenizer(list(corpus))) <= 8000


def test_tokenizer_round_trip(trained):
    original, directory = trained
    reloaded = AutoTokenizer.from_pretrained(directory)
    assert reloaded.model_max_length == 512
    assert reloaded.get_vocab() == original.get_vocab()
    texts = ["hello world", "The acting was [MASK] .", "this movie was a waste of time !", "Zyx?"]
    for text in texts:
        ids = reloaded(text).input_ids
        assert ids == original(text).input_ids
        assert ids[0] == reloaded.cls_token_id and ids[-1] == reloaded.sep_token_id
    assert reloaded.convert_ids_to_tokens(reloaded("the acting was [MASK] .").input_ids) == [
        "[CLS]", "the", "acting", "was", "[MASK]", ".", "[SEP]",
    ]
    ids = reloaded("the plot was great .").input_ids
    assert reloaded.decode(ids, skip_special_tokens=True) == "the plot was great."


def test_tokenizer_masks_word_ids_and_pairs(trained):
    tokenizer, _ = trained
    encoding = tokenizer("the cinematography was breathtaking .", return_special_tokens_mask=True)
    assert encoding.special_tokens_mask == [1] + [0] * (len(encoding.input_ids) - 2) + [1]
    word_ids = encoding.word_ids()
    assert word_ids[0] is None and word_ids[-1] is None
    assert word_ids[1:-1] == sorted(word_ids[1:-1]) and set(word_ids[1:-1]) == set(range(5))
    pair = tokenizer("a good film", "a bad film", return_special_tokens_mask=True)
    ids, sep = pair.input_ids, tokenizer.sep_token_id
    first_sep = ids.index(sep)
    assert ids.count(sep) == 2 and ids[-1] == sep
    assert pair.token_type_ids == [0] * (first_sep + 1) + [1] * (len(ids) - first_sep - 1)
    assert sum(pair.special_tokens_mask) == 3


def test_tiny_bert_config_runs_with_tokenizer(trained):
    tokenizer, _ = trained
    config = tiny_bert_config(len(tokenizer), hidden_dropout_prob=0.0)
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads) == (128, 2, 2)
    assert config.intermediate_size == 512
    assert (config.max_position_embeddings, config.type_vocab_size) == (256, 2)
    assert config.vocab_size == len(tokenizer) and config.hidden_dropout_prob == 0.0
    batch = tokenizer(["the acting was [MASK] .", "what a film"], padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = BertForMaskedLM(config)(**batch).logits
    assert logits.shape == (2, batch.input_ids.shape[1], len(tokenizer))


def test_demo_config_builds_a_tiny_modernbert_that_saves_and_reloads(trained, tmp_path):
    from transformers import AutoModelForMaskedLM

    from trainer.config.job_config import parse_job_config
    from trainer.mlm import DEMO_CONFIG, MLM_JOB
    from trainer.models.loading import load_model

    tokenizer, _ = trained
    model_args = parse_job_config(MLM_JOB.all_sections, [], default_config=DEMO_CONFIG).model
    model = load_model(model_args, AutoModelForMaskedLM, tokenizer)
    config = model.config
    assert (config.model_type, config.hidden_size, config.num_hidden_layers) == ("modernbert", 128, 2)
    assert len(config.layer_types) == 2  # re-derived after --config_overrides, or the saved config won't load
    assert (config.cls_token_id, config.sep_token_id) == (tokenizer.cls_token_id, tokenizer.sep_token_id)
    model.save_pretrained(tmp_path)
    assert AutoModelForMaskedLM.from_pretrained(tmp_path).config.layer_types == config.layer_types
