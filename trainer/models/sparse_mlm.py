"""Masked-LM work on the masked rows only: same loss, same gradients, a fraction of the FLOPs.

Only ~15% of positions carry an MLM label; every other position's output is computed and thrown away. Two parts of
the model can skip those positions without changing the mathematics:

- the prediction head (transform + vocabulary projection) — for every model type in SPARSE_HEAD_TYPES;
- the last encoder layer of BERT-style encoders: its keys and values still come from every position (the only
  thing other positions feed), but its queries, attention output and feed-forward block run on the masked rows.

Under dropout the masked rows draw their masks from the same distribution as in the dense model; only which random
numbers they use differs. transformers offers neither: its *ForMaskedLM models compute every layer densely and
[batch, seq, vocab] logits. The wrapped model is not modified in any saved way; it exports and reloads as a plain
transformers model.
"""
from __future__ import annotations

import types
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

IGNORE = -100
SPARSE_HEAD_TYPES = ("bert", "roberta", "xlm-roberta", "camembert", "distilbert")
SPARSE_LAST_LAYER_TYPES = ("bert", "roberta", "xlm-roberta", "camembert")  # BertLayer and its copies
# oneDNN (CPU bf16 matrix products) caches a primitive with its buffers per matrix shape. The masked count changes
# every batch, and one new shape per step grew a bf16 run by ~30 MB a step (1.8 GB after 30 steps against a flat
# 1.1 GB). Padding the row counts to these multiples leaves a handful of shapes, for compiled graphs too.
MASKED_ROWS_MULTIPLE = 64
QUERIES_PER_SAMPLE_MULTIPLE = 8


def round_up(count: int, multiple: int) -> int:
    return max(multiple, -(-count // multiple) * multiple)


def masked_row_tensors(labels: np.ndarray) -> dict:
    """Indices of the masked rows of a [batch, seq] label array, for `MaskedLMTask.forward`.

    masked_positions [rows]: flat indices of the masked tokens, then padding rows (position 0, label IGNORE: no
        loss, no gradient), rows a multiple of MASKED_ROWS_MULTIPLE;
    masked_labels [rows]: their labels;
    query_positions [batch, queries]: each sample's masked flat positions, padded with the sample's first token,
        the last layer's attention queries;
    query_rows [rows]: where each masked row sits in the flattened [batch * queries] attention output.
    """
    batch, length = labels.shape
    positions = np.flatnonzero(labels != IGNORE)  # sorted: sample by sample
    rows = round_up(len(positions), MASKED_ROWS_MULTIPLE)
    sample = positions // length
    counts = np.bincount(sample, minlength=batch)
    queries = round_up(int(counts.max(initial=0)), QUERIES_PER_SAMPLE_MULTIPLE)
    rank_in_sample = np.arange(len(positions)) - np.repeat(np.cumsum(counts) - counts, counts)
    query_positions = np.repeat(np.arange(batch, dtype=np.int64)[:, None] * length, queries, axis=1)
    query_positions[sample, rank_in_sample] = positions

    def padded(values: np.ndarray, fill: int) -> torch.Tensor:
        out = np.full(rows, fill, dtype=np.int64)
        out[:len(values)] = values
        return torch.from_numpy(out)

    return {"masked_positions": padded(positions, 0), "masked_labels": padded(labels.reshape(-1)[positions], IGNORE),
            "query_positions": torch.from_numpy(query_positions),
            "query_rows": padded(sample * queries + rank_in_sample, 0)}


@dataclass
class MaskedRows:
    """The index tensors of `masked_row_tensors`, handed to the last layer as one keyword argument."""

    positions: torch.Tensor
    query_positions: torch.Tensor
    query_rows: torch.Tensor


def prediction_head(hf_model, hidden: torch.Tensor) -> torch.Tensor:
    """The model's MLM head (transform + vocabulary projection) on [rows, width] hidden states."""
    kind = hf_model.config.model_type
    if kind == "bert":
        return hf_model.cls(hidden)
    if kind == "distilbert":
        hidden = hf_model.vocab_layer_norm(hf_model.activation(hf_model.vocab_transform(hidden)))
        return hf_model.vocab_projector(hidden)
    return hf_model.lm_head(hidden)  # roberta, xlm-roberta, camembert


def can_sparsify_last_layer(hf_model) -> bool:
    config = hf_model.config
    return (config.model_type in SPARSE_LAST_LAYER_TYPES and not config.is_decoder
            and not config.add_cross_attention and not config.chunk_size_feed_forward
            and config._attn_implementation in ("sdpa", "eager"))  # flex attention passes a BlockMask


def last_encoder_layer(hf_model) -> torch.nn.Module:
    return hf_model.base_model.encoder.layer[-1]


def last_layer_row_parameters(hf_model) -> int:
    """Parameters of the last layer that the sparse last layer runs on the masked rows (all but keys and values)."""
    layer = last_encoder_layer(hf_model)
    key_value = [*layer.attention.self.key.parameters(), *layer.attention.self.value.parameters()]
    return sum(p.numel() for p in layer.parameters()) - sum(p.numel() for p in key_value)


def install_sparse_last_layer(hf_model) -> None:
    """Let the last encoder layer run on the masked rows when called with `masked_rows=`.

    It is installed as the layer's own forward rather than called beside it: FSDP2 and ZeRO-3 gather a layer's
    parameters (and reduce its gradients) in hooks around the layer's __call__. A bound method (not a closure) so
    that a deep copy of the model binds it to the copied layer. Called without `masked_rows` (the fill-mask
    pipeline, anyone else) the layer is unchanged.
    """
    layer = last_encoder_layer(hf_model)
    layer.forward = types.MethodType(sparse_last_layer_forward, layer)


def sparse_last_layer_forward(layer, hidden_states, attention_mask=None, *args, masked_rows: MaskedRows | None = None,
                              **kwargs):
    if masked_rows is None:
        return type(layer).forward(layer, hidden_states, attention_mask, *args, **kwargs)
    return last_layer_on_masked_rows(layer, hidden_states, attention_mask, masked_rows)


def last_layer_on_masked_rows(layer, hidden: torch.Tensor, attention_mask, rows: MaskedRows) -> torch.Tensor:
    """BertLayer.forward for the masked rows: [batch, seq, width] in, [rows, width] out."""
    attention = layer.attention.self
    batch, _, width = hidden.shape
    heads, head_width = attention.num_attention_heads, attention.attention_head_size

    def split_heads(projected: torch.Tensor) -> torch.Tensor:  # [batch * n, width] -> [batch, heads, n, head_width]
        return projected.view(batch, -1, heads, head_width).transpose(1, 2)

    flat = hidden.flatten(0, 1)
    queries = split_heads(attention.query(flat.index_select(0, rows.query_positions.flatten())))
    keys, values = split_heads(attention.key(flat)), split_heads(attention.value(flat))
    # The encoder's bidirectional mask is the same for every query row: keep one row, broadcast over the queries.
    key_mask = None if attention_mask is None else attention_mask[:, :, :1, :]
    attended = F.scaled_dot_product_attention(queries, keys, values, attn_mask=key_mask, scale=attention.scaling,
                                              dropout_p=attention.dropout.p if layer.training else 0.0)
    attended = attended.transpose(1, 2).reshape(-1, width).index_select(0, rows.query_rows)
    attention_output = layer.attention.output(attended, flat.index_select(0, rows.positions))
    return layer.output(layer.intermediate(attention_output), attention_output)
