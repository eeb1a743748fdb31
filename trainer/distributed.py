"""Everything that knows about processes: start-up, collectives, gradient sync, data shards.

accelerate's Accelerator does device placement, DDP wrapping and autocast. Two things are done here by hand:
- Under `torchrun` on a machine without CUDA, Accelerator stays single-process unless told `cpu=True`,
  so N ranks would each train alone on the same data. We pass `cpu=True` whenever CUDA is absent.
- The process-group timeout is raised (`--ddp_timeout`), because ranks wait in a barrier while the local
  main process tokenizes; on a big corpus that outlasts the default 30 minutes.
"""
from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist

from trainer.deepspeed_config import fill_hidden_size_values, load_deepspeed_config, resolve_deepspeed_config
from trainer.errors import require


def make_accelerator(training_args, **plugins):
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs

    require(not (training_args.fp16 and not torch.cuda.is_available()),
            "--fp16 needs a GPU (float16 autocast and loss scaling are CUDA features here); use --bf16 on the CPU")
    timeout = datetime.timedelta(seconds=training_args.ddp_timeout)
    deepspeed_plugin = make_deepspeed_plugin(training_args, timeout)
    if deepspeed_plugin is not None:
        # Only under DeepSpeed: elsewhere accelerate would divide every loss by it in `backward`.
        plugins.update(deepspeed_plugin=deepspeed_plugin,
                       gradient_accumulation_steps=training_args.gradient_accumulation_steps)
    return Accelerator(
        # accelerate turns DeepSpeed off when told cpu=True; DeepSpeed brings its own CPU backend (gloo).
        cpu=deepspeed_plugin is None and (training_args.use_cpu or not torch.cuda.is_available()),
        mixed_precision=training_args.mixed_precision,
        kwargs_handlers=[InitProcessGroupKwargs(timeout=timeout, **process_group_backend(deepspeed_plugin))],
        **plugins,
    )


def process_group_backend(deepspeed_plugin) -> dict:
    """Without CUDA, accelerate finds no backend for DeepSpeed and would count one process: name gloo for it."""
    return {"backend": "gloo"} if deepspeed_plugin is not None and not torch.cuda.is_available() else {}


def deepspeed_requested(training_args) -> bool:
    """`--deepspeed PATH`, or `accelerate launch` with a DeepSpeed config (it says so in the environment)."""
    return bool(training_args.deepspeed) or os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"


def make_deepspeed_plugin(training_args, timeout: datetime.timedelta):
    """accelerate's DeepSpeedPlugin with a config whose "auto" values all come from the command line.

    Under `accelerate launch` the plugin accelerate would build from its environment is the starting point
    (its `deepspeed_config_file`, or the ZeRO fields of the YAML); `--deepspeed PATH` wins over it.
    """
    if not deepspeed_requested(training_args):
        return None
    from accelerate.utils import DeepSpeedPlugin

    if training_args.deepspeed:
        source = f"--deepspeed {training_args.deepspeed}"
        config = load_deepspeed_config(training_args.deepspeed)
    else:
        source = "the accelerate DeepSpeed config"
        config = DeepSpeedPlugin().deepspeed_config
    world_size = default_single_process_environment()
    config = resolve_deepspeed_config(config, training_args, world_size, source)
    start_deepspeed_process_group(timeout)
    return DeepSpeedPlugin(hf_ds_config=config)


def default_single_process_environment() -> int:
    """A plain `python -m` run has no launcher variables; DeepSpeed and accelerate need them: one process."""
    if "LOCAL_RANK" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=os.environ.get("MASTER_PORT", str(free_port())))
    return int(os.environ["WORLD_SIZE"])


def start_deepspeed_process_group(timeout: datetime.timedelta) -> None:
    """Initialise deepspeed.comm before accelerate does, so that CPU runs use gloo and the long timeout."""
    import deepspeed

    backend = None if torch.cuda.is_available() else "gloo"
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, timeout=timeout)


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def uses_deepspeed(accelerator) -> bool:
    from accelerate.utils import DistributedType

    return accelerator.distributed_type == DistributedType.DEEPSPEED


def prepare_deepspeed_for_model(accelerator, hf_config) -> None:
    """Fill the config values that depend on the model (bucket sizes) before `accelerator.prepare`."""
    hidden_size = getattr(hf_config, "hidden_size", None)
    if uses_deepspeed(accelerator) and hidden_size:
        fill_hidden_size_values(accelerator.deepspeed_plugin.deepspeed_config, hidden_size)


def is_zero3(accelerator) -> bool:
    return uses_deepspeed(accelerator) and accelerator.deepspeed_plugin.zero_stage == 3


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum over ranks, in place, returned for chaining. A no-op in a single process."""
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_gather_objects(obj) -> list:
    if not is_distributed():
        return [obj]
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def set_gradient_sync(model: torch.nn.Module, enabled: bool) -> None:
    """Skip DDP's all-reduce on non-final micro-steps of gradient accumulation.

    We flip the flag that `DDP.no_sync()` flips rather than use the context manager, so that the loop need not
    wrap the final micro-step differently from the others (the same trick as nanoGPT).
    """
    if isinstance(model, torch.nn.parallel.DistributedDataParallel):
        model.require_backward_grad_sync = enabled


def backward(accelerator, loss: torch.Tensor, last_micro_step: bool) -> None:
    """Backward of one micro-step; the gradient sync flag (`set_gradient_sync`) was set before the forward.

    Under DeepSpeed the engine accumulates, reduces, clips and steps the optimizer itself at the boundary we
    mark. It would also divide the loss by the accumulation steps; that is switched off (`scale_wrt_gas`)
    because the loss is already normalised by the item count of the whole step, exactly as under DDP.
    """
    if uses_deepspeed(accelerator):
        accelerator.deepspeed_engine_wrapped.backward(loss, sync_gradients=last_micro_step, scale_wrt_gas=False)
    else:
        accelerator.backward(loss)


def full_state_dict(accelerator, model, submodule: torch.nn.Module) -> dict | None:
    """The complete weights of `submodule` (on rank 0) under DeepSpeed; None elsewhere, where its own are complete.

    Every rank must call this: under ZeRO-3 each holds a shard and the 16-bit gather is a collective.
    """
    if not uses_deepspeed(accelerator):
        return None
    state = accelerator.get_state_dict(model)
    prefix = next(name for name, module in accelerator.unwrap_model(model).named_modules() if module is submodule)
    prefix = f"{prefix}." if prefix else ""
    return {key[len(prefix):]: value for key, value in state.items() if key.startswith(prefix)}


def save_deepspeed_checkpoint(model, directory: str, tag: str = "deepspeed") -> None:
    """DeepSpeed's sharded checkpoint under `directory/tag`: every rank writes its own model/optimizer shards."""
    model.save_checkpoint(directory, tag=tag)


def load_deepspeed_checkpoint(model, directory: str, tag: str = "deepspeed") -> None:
    """Every rank reads back its shards; a missing or foreign checkpoint is an error, not a silent fresh start."""
    path, _ = model.load_checkpoint(directory, tag=tag, load_module_strict=True)
    require(path is not None, f"no DeepSpeed checkpoint '{tag}' in {directory}")


class GlobalBatchSampler:
    """Shards one global sample order across ranks: the same samples per optimizer step at every world size.

    Epoch `e` visits `randperm(len(dataset))` seeded by `seed + e`. Optimizer step `s` of the epoch takes the
    `global_batch_size = per_device_batch * world_size * accumulation` samples at positions
    `[s * global_batch_size, (s + 1) * global_batch_size)`; micro-step `m` gives rank `r` the
    `per_device_batch` samples at offset `(m * world_size + r) * per_device_batch` inside it. The samples of
    an incomplete final global batch are dropped, so 1 process x batch 16 and 2 processes x batch 4 x
    accumulation 2 see exactly the same samples in every step. Positions are counted in samples, so a
    resumed run may change world size and still continue the same order.
    """

    def __init__(self, dataset_size: int, per_device_batch_size: int, world_size: int, rank: int,
                 accumulation_steps: int, seed: int, shuffle: bool = True):
        self.dataset_size = dataset_size
        self.per_device_batch_size = per_device_batch_size
        self.world_size = world_size
        self.rank = rank
        self.accumulation_steps = accumulation_steps
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = 0
        self.start_sample = 0  # position in the epoch's global order where iteration starts

    @property
    def global_batch_size(self) -> int:
        return self.per_device_batch_size * self.world_size * self.accumulation_steps

    @property
    def steps_per_epoch(self) -> int:
        return self.dataset_size // self.global_batch_size

    def epoch_order(self, epoch: int) -> torch.Tensor:
        if not self.shuffle:
            return torch.arange(self.dataset_size)
        return torch.randperm(self.dataset_size, generator=torch.Generator().manual_seed(self.seed + epoch))

    def __len__(self) -> int:
        """Micro-batches this rank yields in the current epoch."""
        remaining_steps = (self.steps_per_epoch * self.global_batch_size - self.start_sample) // self.global_batch_size
        return remaining_steps * self.accumulation_steps

    def __iter__(self):
        order = self.epoch_order(self.epoch)
        micro = self.per_device_batch_size
        for step_start in range(self.start_sample, self.steps_per_epoch * self.global_batch_size,
                                self.global_batch_size):
            for micro_step in range(self.accumulation_steps):
                start = step_start + (micro_step * self.world_size + self.rank) * micro
                yield order[start:start + micro].tolist()


def shard_for_evaluation(dataset_size: int, world_size: int, rank: int) -> range:
    """A contiguous, disjoint slice of the evaluation set per rank: every sample counted exactly once."""
    per_rank, extra = divmod(dataset_size, world_size)
    start = rank * per_rank + min(rank, extra)
    return range(start, start + per_rank + (1 if rank < extra else 0))


_host_group = None


def any_rank(flag: bool) -> bool:
    """True on every rank if `flag` is True on any rank: how all ranks agree to stop at the same step.

    The reduction runs over a gloo group on CPU tensors, so under NCCL it adds a tiny host-side collective per
    call but no GPU synchronisation. The group is created on first use, which every rank reaches at the same step.
    """
    global _host_group
    if not is_distributed():
        return flag
    if _host_group is None:
        _host_group = dist.new_group(backend="gloo")
    tensor = torch.tensor([int(flag)], dtype=torch.int32)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX, group=_host_group)
    return bool(tensor.item())
