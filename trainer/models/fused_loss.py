"""The output layer and cross-entropy in one pass: the loss's gradients are computed in the forward, chunk by chunk.

Why by hand: torch has no fused linear + cross-entropy (Liger's is Triton, so GPU-only, and not a dependency).
The usual path materialises [rows, vocabulary] logits, then a float32 copy, log-softmax and, in the backward, as
many again; with a large vocabulary those logits are most of a causal LM's activation memory, and every pass over
them is memory-bound. Here each chunk's logits live for one chunk only and stay small enough to be reused from
the CPU's cache (or the GPU's L2) by the few passes that follow the matmul: the row maximum, the softmax in place, minus
the one-hot target, and the two gradient matmuls. No recomputation: the backward only scales the stored gradients by the
incoming gradient of the summed loss (a scalar).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch.nn.functional import linear


def cross_entropy_in_place(logits: torch.Tensor, targets: torch.Tensor):
    """The summed cross-entropy of float32 `logits` [rows, vocabulary], whose storage then holds exp(logits - row
    maximum), and the row sums of those: (loss, exponentials, row sums). In place because logsumexp or log_softmax
    would allocate a second buffer the size of the logits."""
    picked = logits.gather(1, targets[:, None])
    row_max = logits.amax(dim=1, keepdim=True)
    exponentials = logits.sub_(row_max).exp_()
    row_sum = exponentials.sum(dim=1, keepdim=True)
    return (row_max + row_sum.log() - picked).sum(), exponentials, row_sum


class FusedLinearCrossEntropy(torch.autograd.Function):
    """sum_i CE(hidden_i @ weight^T + bias, target_i), with d/d(hidden, weight, bias) computed in the forward."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                targets: torch.Tensor, chunk: int) -> torch.Tensor:
        # Under autocast the matmuls run in its precision, as `head(hidden)` would; softmax and sums in float32.
        grad_hidden = torch.empty_like(hidden)
        # A frozen head (e.g. BitFit: tied to the frozen embeddings) costs no weight-gradient matmul.
        wants_weight, wants_bias = ctx.needs_input_grad[1], bias is not None and ctx.needs_input_grad[2]
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if wants_weight else None
        grad_bias = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if wants_bias else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        device_type = hidden.device.type
        compute_dtype = (torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type)
                         else hidden.dtype)
        for start in range(0, hidden.shape[0], chunk):
            rows, target = hidden[start:start + chunk], targets[start:start + chunk]
            loss, exponentials, row_sum = cross_entropy_in_place(linear(rows, weight, bias).float(), target)
            total += loss
            # d CE / d logits = softmax - one_hot(target), in place.
            exponentials.div_(row_sum).scatter_add_(1, target[:, None], exponentials.new_full((len(target), 1), -1.0))
            grad_logits = exponentials.to(compute_dtype)
            del exponentials  # under autocast, the float32 copy goes before the matmuls
            grad_hidden[start:start + chunk] = grad_logits @ weight
            if grad_weight is not None:
                grad_weight += grad_logits.t() @ rows
            if grad_bias is not None:
                grad_bias += grad_logits.sum(0, dtype=torch.float32)
            del grad_logits  # before the next chunk's logits exist: one chunk's buffers at a time, not two
        ctx.save_for_backward(grad_hidden, grad_weight, grad_bias)
        ctx.weight_dtype = weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad_total: torch.Tensor):
        grad_hidden, grad_weight, grad_bias = ctx.saved_tensors
        grad_weight = None if grad_weight is None else (grad_weight * grad_total).to(ctx.weight_dtype)
        grad_bias = None if grad_bias is None else (grad_bias * grad_total).to(ctx.weight_dtype)
        return grad_hidden * grad_total.to(grad_hidden.dtype), grad_weight, grad_bias, None, None


def fused_linear_cross_entropy(hidden: torch.Tensor, head: torch.nn.Linear, targets: torch.Tensor,
                               chunk: int) -> torch.Tensor:
    """The summed cross-entropy of `head(hidden)` against `targets`, `chunk` rows of logits at a time."""
    return FusedLinearCrossEntropy.apply(hidden, head.weight, head.bias, targets, chunk)
