"""Elastic Weight Consolidation (Kirkpatrick et al., 2017) for every job: the engine's, not a job's.

After task A, `--save_fisher` writes FISHER_FILE beside the model: for every trainable parameter the diagonal
empirical Fisher information F_i = (1/N) sum_n (d loss_n / d theta_i)^2 over the first N training samples in
dataset order (`--fisher_samples`), where loss_n is sample n's mean loss (its `loss_sum` over its
`num_loss_items`, the engine's Task contract), and the anchor theta*_i (the weights saved beside it).

Training task B with `--ewc_from DIR --ewc_lambda L` adds (L/2) sum_i F_i (theta_i - theta*_i)^2 to the loss.
It is added once per optimizer step, as its gradient L F (theta - theta*) added to the step's reduced gradient
(after the backward passes and their sync, before clipping and the update), so the accumulation split cannot
change it. Parameters are matched by name; those of B that A's file lacks (e.g. a new head) are not penalised.

Nothing here knows about processes: what each rank holds of a parameter (all of it, an FSDP2 shard, a ZeRO-3
partition) is trainer.distributed.launch's. No library offers this: peft and transformers have no EWC, and the
continual-learning packages (avalanche) bring their own training loops.
"""
from __future__ import annotations

import copy
import os

import torch

from trainer.data.samplers import shard_for_evaluation
from trainer.distributed.collectives import all_reduce_sum
from trainer.distributed.launch import sharded_state_name
from trainer.distributed.parameters import (add_to_local_gradient, gather_full_parameters, local_part, local_values,
                                            parameters_whole_on_every_rank)
from trainer.errors import UsageError, require
from trainer.layout import FISHER_FILE

FISHER, ANCHOR = "fisher/", "anchor/"


def trainable_parameters(model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    """(name, parameter) of the unwrapped task model's trainable parameters, tied ones once."""
    return [(name, parameter) for name, parameter in model.named_parameters() if parameter.requires_grad]


# ----------------------------------------------------------------------------------------------- the Fisher
class FisherPass:
    """What `--save_fisher` needs of the engine's model after training, prepared before `accelerator.prepare`.

    The per-sample gradients are computed on a plain module, with `torch.autograd.grad`: it fills no `.grad`, so
    neither DDP's reducer nor any optimizer state sees them. Each rank takes a contiguous shard of the N samples,
    sums the squares in float64, and the sums are all-reduced: exact at any world size (up to the order of float64
    additions). Under sharded parameters (DeepSpeed, FSDP2) that plain module is a copy of the task model taken
    before `prepare` (which shards the original in place), kept in host memory for the run and filled with the
    final weights, gathered whole on every rank. Cost: N forward/backward passes of one sample in all (N / world
    size per rank), one all-reduce of one float64 copy of the parameters; under sharding also a host copy of the
    model for the whole run and, at the end, the whole model (with its gradients) on each device. That last part
    assumes the model fits one device in fp32; one that does not (the reason for ZeRO-3 or FSDP) needs the Fisher
    computed shard by shard, which this does not do.
    """

    def __init__(self, task_model: torch.nn.Module, accelerator, samples: int):
        self.accelerator = accelerator
        self.samples = samples
        # Modules held outside the module tree (a distillation teacher) are shared by the copy, not duplicated;
        # aliases of the tree's own modules (e.g. clm's `inner`) are copied with it.
        tree = {id(module) for module in task_model.modules()}
        shared = {id(value): value for value in vars(task_model).values()
                  if isinstance(value, torch.nn.Module) and id(value) not in tree}
        self.copy = copy.deepcopy(task_model, memo=shared) if sharded_state_name(accelerator) else None

    def compute(self, prepared_model, dataset, columns, collator, make_loader) -> tuple[dict, dict, int]:
        """(Fisher, anchor, N): {name: tensor} of the trainable parameters, on every rank, float32 on the CPU."""
        from trainer.data.batches import EpochIndices

        accelerator = self.accelerator
        live = accelerator.unwrap_model(prepared_model)
        anchors = gather_full_parameters(accelerator, trainable_parameters(live))
        model = live if self.copy is None else self.load_copy(anchors)
        named = [(name, parameter) for name, parameter in trainable_parameters(model) if name in anchors]
        count = min(self.samples, len(dataset))
        shard = shard_for_evaluation(count, accelerator.num_processes, accelerator.process_index)
        # Epoch 0's training collation (e.g. MLM masks) of each sample alone: independent of batching and ranks.
        loader = make_loader(dataset, columns, [EpochIndices([index], 0) for index in shard], collator)
        sums = {name: torch.zeros(p.shape, dtype=torch.float64, device=p.device) for name, p in named}
        was_training = model.training
        model.eval()  # no dropout: the Fisher of the model itself, the same on every rank and world size
        for batch in loader:
            items = max(batch.pop("num_loss_items"), 1)
            batch.pop("sample_id")
            batch = {key: value.to(accelerator.device) for key, value in batch.items()}
            loss = model(**batch)["loss_sum"] / items
            gradients = torch.autograd.grad(loss, [p for _, p in named], allow_unused=True)
            for (name, _), gradient in zip(named, gradients):
                if gradient is not None:
                    sums[name] += gradient.double().square()
        model.train(was_training)
        fisher = {name: (all_reduce_sum(total) / count).float().cpu() for name, total in sums.items()}
        self.copy = None
        return fisher, {name: anchors[name].float().cpu() for name in fisher}, count

    def load_copy(self, anchors: dict) -> torch.nn.Module:
        model = self.copy.to(self.accelerator.device)
        with torch.no_grad():
            for name, parameter in trainable_parameters(model):
                parameter.copy_(anchors[name])
        return model


def save_fisher(directory: str, fisher: dict, anchors: dict, samples: int, write) -> None:
    """FISHER_FILE in `directory`, through `write(function, *args)` (the engine's disk-error handling)."""
    from safetensors.torch import save_file

    tensors = {**{FISHER + name: value.contiguous() for name, value in fisher.items()},
               **{ANCHOR + name: value.contiguous() for name, value in anchors.items()}}
    write(save_file, tensors, os.path.join(directory, FISHER_FILE), {"fisher_samples": str(samples)})


# ---------------------------------------------------------------------------------------------- the penalty
def read_fisher(directory: str) -> tuple[dict, dict]:
    """(Fisher, anchor) from `directory`'s FISHER_FILE; a file that is not one is a UsageError."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = os.path.join(directory, FISHER_FILE)
    try:
        tensors = load_file(path)
    except (SafetensorError, OSError, ValueError) as error:
        message = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise UsageError(f"--ewc_from {directory}: cannot read its {FISHER_FILE} ({message}); write it again with "
                         f"--save_fisher") from None
    fisher = {key[len(FISHER):]: value for key, value in tensors.items() if key.startswith(FISHER)}
    anchors = {key[len(ANCHOR):]: value for key, value in tensors.items() if key.startswith(ANCHOR)}
    require(fisher and fisher.keys() == anchors.keys(),
            f"--ewc_from {directory}: {FISHER_FILE} holds no matching Fisher and anchor tensors; write it with "
            f"--save_fisher")
    return fisher, anchors


class ElasticWeightConsolidation:
    """The penalty (L/2) sum_i F_i (theta_i - theta*_i)^2 of one earlier task, on this rank's pieces of the
    parameters."""

    def __init__(self, directory: str, strength: float, task_model: torch.nn.Module):
        """Read and check the file against the task model (before `prepare`: a refused run writes nothing)."""
        self.fisher, self.anchors = read_fisher(directory)
        self.strength = strength
        parameters = dict(task_model.named_parameters())
        missing = [name for name in self.fisher if name not in parameters]
        if missing:
            raise UsageError(f"--ewc_from {directory}: {len(missing)} of its {len(self.fisher)} parameters are not in "
                             f"this model (e.g. {missing[0]}); give the output directory of a run of the same model "
                             f"and job")
        for name, value in self.fisher.items():
            shape = tuple(parameters[name].shape)
            require(tuple(value.shape) == shape and tuple(self.anchors[name].shape) == shape,
                    f"--ewc_from {directory}: {name} has shape {tuple(value.shape)} there but {shape} in this model "
                    f"(e.g. another label set or vocabulary); EWC needs the same architecture")
        self.terms = []  # (prepared parameter, local Fisher, local anchor), filled by `place`
        self.share = 1.0

    def place(self, accelerator, prepared_model) -> None:
        """Cut F and theta* to what this rank holds of each prepared parameter, on its device."""
        parameters = dict(trainable_parameters(accelerator.unwrap_model(prepared_model)))
        for name in sorted(self.fisher.keys() & parameters.keys()):
            parameter = parameters[name]
            device = local_values(accelerator, parameter).device
            self.terms.append((parameter, local_part(accelerator, parameter, self.fisher[name].to(device)),
                               local_part(accelerator, parameter, self.anchors[name].to(device))))
        self.fisher = self.anchors = None  # the full copies are not needed any more
        # Whole parameters on every rank: each computes the whole penalty, which rank 0 alone reports.
        self.share = 1.0 if not parameters_whole_on_every_rank(accelerator) or accelerator.is_main_process else 0.0
        self.accelerator = accelerator

    @torch.no_grad()
    def add_gradient(self) -> torch.Tensor:
        """Add L F (theta - theta*) to this rank's piece of each parameter's reduced gradient; return this rank's
        share of the penalty (L/2) sum F (theta - theta*)^2 as a float64 device tensor (summed over ranks when
        logged, never read here)."""
        penalty = None
        for parameter, fisher, anchor in self.terms:
            difference = local_values(self.accelerator, parameter).float() - anchor
            weighted = fisher * difference
            if add_to_local_gradient(self.accelerator, parameter, self.strength * weighted):
                term = (weighted * difference).sum(dtype=torch.float64)
                penalty = term if penalty is None else penalty + term
        if penalty is None:
            return torch.zeros((), dtype=torch.float64, device=self.accelerator.device)
        return (penalty * (self.strength / 2 * self.share)).to(self.accelerator.device)
