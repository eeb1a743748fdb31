"""Masked-rows-only computation (sparse_mlm) gives the dense model's loss and gradients."""
import copy

import numpy as np
import pytest
import torch
from transformers import AutoConfig, AutoModelForMaskedLM

from trainer.mlm import MaskedLMTask
from trainer.models.sparse_mlm import IGNORE, masked_row_tensors

TINY = dict(vocab_size=211, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
            max_position_embeddings=80, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
CONFIGS = {
    "bert": TINY,
    "roberta": {**TINY, "pad_token_id": 1},
    "distilbert": dict(vocab_size=211, dim=32, n_layers=2, n_heads=2, hidden_dim=64, max_position_embeddings=80,
                       dropout=0.0, attention_dropout=0.0),
    "electra": {**TINY, "embedding_size": 32},  # not special-cased: the dense fallback path
}
# which parts run on the masked rows only: (head, last layer)
SPARSE_PARTS = {"bert": (True, True), "roberta": (True, True), "distilbert": (True, False), "electra": (False, False)}


def masked_batch(padded: bool):
    input_ids = torch.randint(5, 211, (3, 24))
    attention_mask = torch.ones_like(input_ids)
    if padded:
        input_ids[2, 18:] = 1
        attention_mask[2, 18:] = 0
    labels = torch.full_like(input_ids, IGNORE)
    chosen = (torch.rand(input_ids.shape) < 0.2) & attention_mask.bool()
    chosen[1] = False  # a sample without a masked token
    labels[chosen] = input_ids[chosen]
    return input_ids, attention_mask if padded else None, labels


@pytest.mark.parametrize("padded", [True, False], ids=["padded", "blocks"])
@pytest.mark.parametrize("model_type", list(CONFIGS))
def test_sparse_computation_matches_dense_loss_and_gradients(model_type, padded):
    torch.manual_seed(0)
    model = AutoModelForMaskedLM.from_config(AutoConfig.for_model(model_type, **CONFIGS[model_type]))
    input_ids, attention_mask, labels = masked_batch(padded)
    masked = int((labels != IGNORE).sum())

    dense_loss = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss * masked
    dense_loss.backward()
    dense_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()

    task = MaskedLMTask(model)
    assert (task.sparse_head, task.sparse_last_layer) == SPARSE_PARTS[model_type]
    # Padding rows (position 0, label IGNORE), as the collators send them, add no loss and no gradient.
    rows = masked_row_tensors(labels.numpy())
    assert len(rows["masked_labels"]) > masked
    sparse_loss = task(input_ids, attention_mask=attention_mask, **rows)["loss_sum"]
    sparse_loss.backward()
    assert sparse_loss.item() == pytest.approx(dense_loss.item(), rel=1e-5)
    assert dense_grads.keys() == {n for n, p in model.named_parameters() if p.grad is not None}
    for name, grad in dense_grads.items():
        torch.testing.assert_close(model.get_parameter(name).grad, grad, rtol=1e-4, atol=1e-6, msg=name)
    # Without the masked rows the model is the plain transformers model (pipelines, export).
    assert model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss.item() * masked == \
        pytest.approx(dense_loss.item(), rel=1e-6)


def test_a_deep_copy_computes_with_its_own_last_layer():
    torch.manual_seed(0)
    task = MaskedLMTask(AutoModelForMaskedLM.from_config(AutoConfig.for_model("bert", **TINY)))
    input_ids, attention_mask, labels = masked_batch(padded=True)
    rows = masked_row_tensors(labels.numpy())
    copied = copy.deepcopy(task)
    with torch.no_grad():
        loss = task(input_ids, attention_mask=attention_mask, **rows)["loss_sum"].item()
        for parameter in copied.hf_model.base_model.encoder.layer[-1].parameters():
            parameter.add_(torch.randn_like(parameter))
        assert copied(input_ids, attention_mask=attention_mask, **rows)["loss_sum"].item() != pytest.approx(loss)
        assert task(input_ids, attention_mask=attention_mask, **rows)["loss_sum"].item() == pytest.approx(loss)


def test_masked_row_tensors_index_each_sample_queries():
    labels = np.full((3, 10), IGNORE)
    labels[0, [2, 7]] = [11, 12]
    labels[2, [0, 4, 5]] = [13, 14, 15]
    rows = masked_row_tensors(labels)
    assert rows["masked_positions"][:5].tolist() == [2, 7, 20, 24, 25]
    assert rows["masked_labels"][:5].tolist() == [11, 12, 13, 14, 15]
    assert len(rows["masked_positions"]) == 64 and (rows["masked_labels"][5:] == IGNORE).all()
    queries = rows["query_positions"]
    assert queries.shape == (3, 8)  # the most masked tokens in a sample (3), rounded up to 8
    assert queries[0, :2].tolist() == [2, 7] and queries[2, :3].tolist() == [20, 24, 25]
    assert (queries[1] == 10).all()  # no masked token: the sample's first position, never read back
    assert rows["query_rows"][:5].tolist() == [0, 1, 16, 17, 18]
    assert queries.flatten()[rows["query_rows"][:5]].tolist() == rows["masked_positions"][:5].tolist()
