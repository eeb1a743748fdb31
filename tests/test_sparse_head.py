"""The sparse MLM head (projection on masked rows only) gives the dense head's loss and gradients."""
import pytest
import torch
from transformers import AutoConfig, AutoModelForMaskedLM

from trainer.mlm import IGNORE, MaskedLMTask

TINY = dict(vocab_size=211, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
            max_position_embeddings=80, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
CONFIGS = {
    "bert": TINY,
    "roberta": {**TINY, "pad_token_id": 1},
    "distilbert": dict(vocab_size=211, dim=32, n_layers=2, n_heads=2, hidden_dim=64, max_position_embeddings=80,
                       dropout=0.0, attention_dropout=0.0),
    "electra": {**TINY, "embedding_size": 32},  # not special-cased: the dense fallback path
}


@pytest.mark.parametrize("model_type", list(CONFIGS))
def test_sparse_head_matches_dense_loss_and_gradients(model_type):
    torch.manual_seed(0)
    model = AutoModelForMaskedLM.from_config(AutoConfig.for_model(model_type, **CONFIGS[model_type]))
    input_ids = torch.randint(5, 211, (3, 24))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[2, 18:] = 0
    labels = torch.full_like(input_ids, IGNORE)
    chosen = torch.rand(input_ids.shape) < 0.2
    chosen[2, 18:] = False
    labels[chosen] = input_ids[chosen]
    positions = torch.nonzero(labels.view(-1) != IGNORE).squeeze(1)

    dense_loss = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss * len(positions)
    dense_loss.backward()
    dense_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()

    # Padded rows (position 0, label IGNORE), as the collators send them, add no loss and no gradient.
    padded_positions = torch.cat([positions, torch.zeros(5, dtype=torch.long)])
    padded_labels = torch.cat([labels.view(-1)[positions], torch.full((5,), IGNORE)])
    sparse_loss = MaskedLMTask(model)(input_ids, padded_positions, padded_labels, attention_mask)["loss_sum"]
    sparse_loss.backward()
    assert sparse_loss.item() == pytest.approx(dense_loss.item(), rel=1e-5)
    for name, grad in dense_grads.items():
        torch.testing.assert_close(model.get_parameter(name).grad, grad, rtol=1e-4, atol=1e-6, msg=name)
