"""Everything that knows about processes: start-up, collectives, gradient sync, data shards.

accelerate's Accelerator does device placement, DDP wrapping and autocast. These are done here by hand:
- Under `torchrun` on a machine without CUDA, Accelerator stays single-process unless told `cpu=True`,
  so N ranks would each train alone on the same data. We pass `cpu=True` whenever CUDA is absent.
- FSDP2 on the CPU: accelerate only turns FSDP on for accelerator devices and otherwise silently runs DDP;
  torch's FSDP2 (`fully_shard`) runs on the CPU with gloo, so we turn it on ourselves (`use_fsdp_on_cpu`).
- The process-group timeout is raised (`--ddp_timeout`), because ranks wait in a barrier while the local
  main process tokenizes; on a big corpus that outlasts the default 30 minutes.
- Under torchrun we create the process group ourselves on a store prefixed by the restart count. torchrun
  (`--max-restarts`) reuses one store across restarts, and gloo's mesh set-up then reads the dead generation's
  addresses and fails with "connectFullMesh ... Connection refused"; a fresh prefix per restart avoids that.
  accelerate (and DeepSpeed) use a process group that already exists.
"""
from __future__ import annotations

import contextlib
import datetime
import logging
import os
import warnings

import torch
import torch.distributed as dist

from trainer.deepspeed_config import fill_hidden_size_values, load_deepspeed_config, resolve_deepspeed_config
from trainer.errors import UsageError, require
from trainer.replay import mixed_global_batch, replay_count


def make_accelerator(training_args, **plugins):
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs

    require(not (training_args.fp16 and not torch.cuda.is_available()),
            "--fp16 needs a GPU (float16 autocast and loss scaling are CUDA features here); use --bf16 on the CPU")
    use_cpu = training_args.use_cpu or not torch.cuda.is_available()
    timeout = datetime.timedelta(seconds=training_args.ddp_timeout)
    if "TORCHELASTIC_RESTART_COUNT" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        init_process_group_per_restart("gloo" if use_cpu else "nccl", timeout)
    if not use_cpu:
        # TF32 tensor cores for fp32 matrix products: ~8x the fp32 rate on Ampere+ at 10-bit mantissa inputs,
        # the precision every mixed-precision recipe already accepts.
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    deepspeed_plugin = make_deepspeed_plugin(training_args, timeout)
    if deepspeed_plugin is not None:
        # Only under DeepSpeed: elsewhere accelerate would divide every loss by it in `backward`.
        plugins.update(deepspeed_plugin=deepspeed_plugin,
                       gradient_accumulation_steps=training_args.gradient_accumulation_steps)
    accelerator = Accelerator(
        # accelerate turns DeepSpeed off when told cpu=True; DeepSpeed brings its own CPU backend (gloo).
        cpu=deepspeed_plugin is None and use_cpu,
        dynamo_backend="no",  # --torch_compile compiles the blocks (trainer.compilation), not the whole model
        mixed_precision=training_args.mixed_precision,
        kwargs_handlers=[InitProcessGroupKwargs(timeout=timeout, **process_group_backend(deepspeed_plugin))],
        **plugins,
    )
    if deepspeed_plugin is None:
        quiet_deepspeed_accelerator_warning()
    else:
        without_zero_init()
    if use_cpu:  # after Accelerator(), which sets its own count for several CPU processes
        share_cpu_cores(int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    if fsdp_requested() and use_cpu:
        use_fsdp_on_cpu(accelerator, training_args)
    return accelerator


def quiet_deepspeed_accelerator_warning() -> None:
    """Drop DeepSpeed's "Setting accelerator to CPU ..." warning in runs that do not use DeepSpeed.

    Where DeepSpeed is installed, accelerate imports it (e.g. `unwrap_model` checks for a DeepSpeedEngine), and
    DeepSpeed's first `get_accelerator()` logs that warning on every machine without CUDA. The filter sits on
    DeepSpeed's own logger, so it also catches the imports that come later; DeepSpeed runs keep the warning.
    """
    deepspeed_logger = logging.getLogger("DeepSpeed")
    if not_the_cpu_accelerator_warning not in deepspeed_logger.filters:  # once, however many jobs a process runs
        deepspeed_logger.addFilter(not_the_cpu_accelerator_warning)


def not_the_cpu_accelerator_warning(record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith("Setting accelerator to CPU")


def cpu_threads_per_process(cores: int, local_processes: int) -> int:
    """An equal share of the cores for each process of this machine, at least one thread."""
    return max(1, cores // max(local_processes, 1))


def available_cores() -> int:
    """The cores this process may run on (its CPU affinity: Slurm's and taskset's limits included)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def share_cpu_cores(local_processes: int) -> None:
    """With several processes on one CPU machine, give each `cpu_threads_per_process` torch threads, unless
    OMP_NUM_THREADS is set (by the user, or by the launcher: torchrun sets 1 for several processes, accelerate
    and deepspeed launchers an equal share). torch's default, every core in every process, puts more busy threads
    than cores on the machine, and OpenMP's spinning threads then slow every step many times over."""
    if local_processes > 1 and "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(cpu_threads_per_process(available_cores(), local_processes))


def describe_threads() -> str:
    """For the start-up log line, e.g. "2 torch threads per process on 2 cores (OMP_NUM_THREADS unset)"."""
    setting = os.environ.get("OMP_NUM_THREADS")
    return (f"{torch.get_num_threads()} torch threads per process on {available_cores()} cores "
            f"({'OMP_NUM_THREADS=' + setting if setting else 'OMP_NUM_THREADS unset'})")


def fsdp_requested() -> bool:
    """`accelerate launch` with an FSDP config says so in the environment (with its FSDP_* settings)."""
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


def use_fsdp_on_cpu(accelerator, training_args) -> None:
    """Make accelerate's FSDP2 path (`prepare` -> `fsdp2_prepare_model`, optimizer parameter switch, full state
    dicts) run on the CPU processes that `cpu=True` started.

    accelerate (1.15, `AcceleratorState.__init__`) sets `DistributedType.FSDP` only for multi-accelerator types
    and silently runs DDP under MULTI_CPU, although torch's `fully_shard` works on the CPU with gloo. The state
    is shared by every Accelerator of the process; like accelerate's own switch we also set the type in
    PartialState, which every later `AcceleratorState()` (e.g. the prepared optimizer's) copies back over it.
    """
    from accelerate import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    plugin = FullyShardedDataParallelPlugin()  # reads the FSDP_* variables `accelerate launch` sets
    require(plugin.fsdp_version == 2, f"FSDP on the CPU needs fsdp_version: 2 (got {plugin.fsdp_version}); "
                                      f"see launch/accelerate/cpu_fsdp2.yaml")
    require(accelerator.num_processes > 1,
            f"FSDP on the CPU needs 2 or more processes (got {accelerator.num_processes}); launch with "
            f"accelerate launch --num_processes 2 or more, or drop the FSDP config")
    if training_args.mixed_precision != "no":
        plugin.set_mixed_precision(training_args.mixed_precision)
    accelerator.state.fsdp_plugin = plugin
    accelerator.state.distributed_type = PartialState().distributed_type = DistributedType.FSDP


def without_zero_init() -> None:
    """Build models whole (no deepspeed.zero.Init): jobs build them inside `main_process_first`, where
    the collectives of a partitioned construction would deadlock. accelerate registers the DeepSpeed config
    with transformers even with zero3_init_flag=False, so unregister it; prepare() partitions the model.
    Each process thus needs the whole model in host memory once."""
    from transformers.integrations import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()


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
    return DeepSpeedPlugin(hf_ds_config=config, zero3_init_flag=False)  # see `without_zero_init`


def default_single_process_environment() -> int:
    """A plain `python -m` run has no launcher variables; DeepSpeed and accelerate need them: one process."""
    if "LOCAL_RANK" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=os.environ.get("MASTER_PORT", str(free_port())))
    return int(os.environ["WORLD_SIZE"])


def start_deepspeed_process_group(timeout: datetime.timedelta) -> None:
    """Initialise deepspeed.comm before accelerate does, so that CPU runs use gloo and the long timeout."""
    import deepspeed

    # DeepSpeed 0.19 calls torch.distributed's all_gather_into_tensor / reduce_scatter_tensor, deprecated in torch
    # 2.13; under ZeRO-3 the warning repeats for every gathered parameter (hundreds of log lines per step).
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.\w+` is deprecated", category=FutureWarning)
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


def describe_parallelism(accelerator) -> str:
    """How the processes share the model, for the log: e.g. "FSDP2 (gloo)", "DeepSpeed ZeRO-2 (gloo)", "DDP (nccl)"."""
    if accelerator.num_processes == 1:
        return "a single process"
    if uses_deepspeed(accelerator):
        kind = f"DeepSpeed ZeRO-{accelerator.deepspeed_plugin.zero_stage}"
    elif uses_fsdp(accelerator):
        kind = f"FSDP{accelerator.state.fsdp_plugin.fsdp_version}"
    else:
        kind = "DDP"
    return f"{kind} ({dist.get_backend()})"


def prepare_for_model(accelerator, hf_model) -> None:
    """Fill what DeepSpeed and FSDP need to know of the model before `accelerator.prepare`: DeepSpeed's bucket
    sizes (from the width), FSDP's transformer block classes (one FSDP unit each)."""
    hidden_size = getattr(hf_model.config, "hidden_size", None)
    if uses_deepspeed(accelerator) and hidden_size:
        fill_hidden_size_values(accelerator.deepspeed_plugin.deepspeed_config, hidden_size)
    if uses_fsdp(accelerator):
        name_fsdp_blocks(accelerator.state.fsdp_plugin, hf_model)


def name_fsdp_blocks(plugin, hf_model) -> None:
    """With TRANSFORMER_BASED_WRAP and no `fsdp_transformer_layer_cls_to_wrap`, accelerate wraps the classes in
    `_no_split_modules` of the module it prepares, which is the job's task wrapper and has none: the model would
    be one FSDP unit. Name the Hugging Face model's blocks instead: the class of its longest layer list (BertLayer,
    GPT2Block, LlamaDecoderLayer), so one YAML serves every model. Not the model's own `_no_split_modules`: BERT's
    also holds BertEmbeddings, whose word embeddings are tied to the MLM decoder in the root unit."""
    from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy

    policy = getattr(plugin.auto_wrap_policy, "func", plugin.auto_wrap_policy)
    if policy is not transformer_auto_wrap_policy or plugin.transformer_cls_names_to_wrap:
        return
    layer_lists = [module for module in hf_model.modules() if isinstance(module, torch.nn.ModuleList) and len(module)]
    names = [type(max(layer_lists, key=len)[0]).__name__] if layer_lists else []
    plugin.transformer_cls_names_to_wrap = names or list(getattr(hf_model, "_no_split_modules", None) or [])


def parameters_sharded(accelerator) -> bool:
    """Under ZeRO-3 (and FSDP) each rank holds a shard of every weight: a forward is a collective that all
    ranks must run together, so nothing may run the model on rank 0 alone."""
    zero3 = uses_deepspeed(accelerator) and accelerator.deepspeed_plugin.zero_stage == 3
    return zero3 or uses_fsdp(accelerator)


def init_process_group_per_restart(backend: str, timeout: datetime.timedelta) -> None:
    if dist.is_initialized():
        return
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                          timeout=timeout)
    prefixed = dist.PrefixStore(f"trainer/restart-{os.environ['TORCHELASTIC_RESTART_COUNT']}", store)
    dist.init_process_group(backend, store=prefixed, rank=rank, world_size=world_size, timeout=timeout)


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


@contextlib.contextmanager
def main_process_first(accelerator):
    """accelerate's `local_main_process_first` (each node's local main process runs the block first, e.g.
    tokenizing into the datasets cache; the other ranks then load from it), where a failure on one rank ends
    the block on every rank instead of leaving the others waiting in a barrier forever.

    Two rounds, each closed by an all-gather of the failures (the barrier accelerate has): the local main
    processes run the block, then the others. A UsageError anywhere becomes the same UsageError on every
    rank (each prints one line and exits 2); any other exception stays as it is on its rank (a traceback)
    and fails the others with a RuntimeError naming that rank.
    """
    main = accelerator.is_local_main_process
    if not main:
        end_round(None)  # round 1: the local main processes run the block
    failure = None
    try:
        yield
    except BaseException as error:
        failure = (("usage", str(error)) if isinstance(error, UsageError) else
                   ("bug", f"rank {accelerator.process_index} failed with {type(error).__name__}: {error}"))
        raise
    finally:
        if main:
            end_round(failure)
        if not main or failure is None:  # round 2 (only after a clean round 1): the other ranks run the block
            end_round(None if main else failure)


def end_round(failure) -> None:
    """Gather every rank's failure, (kind, message) or None. A rank that failed goes on raising its own
    exception; every other rank raises the first UsageError gathered (else a RuntimeError) as its own."""
    failures = [f for f in all_gather_objects(failure) if f is not None]
    if not failures or failure is not None:
        return
    kind, message = next((f for f in failures if f[0] == "usage"), failures[0])
    raise UsageError(message) if kind == "usage" else RuntimeError(message)


def leave_together_under_torchrun(wait_seconds: float = 30.0) -> None:
    """Called by a rank about to exit 2 on bad input. The ranks fail on the same input at about the same time
    (a bad argument on every rank; a data error shared by `main_process_first`), but torchrun SIGTERMs the
    others as soon as the first has exited, and a rank still importing or tearing down then reports -15 instead
    of its own exit code 2 and message. So each failing rank ignores SIGTERM (it is leaving anyway) and waits,
    at most `wait_seconds`, until every rank has counted itself in torchrun's store: then they all print and
    exit 2. Best effort: without a reachable store the rank leaves at once."""
    import signal
    import time

    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1 or "TORCHELASTIC_RUN_ID" not in os.environ:
        return
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                              timeout=datetime.timedelta(seconds=5))
        key = f"trainer/leaving_on_usage_error/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"
        store.add(key, 1)
        deadline = time.monotonic() + wait_seconds
        while store.add(key, 0) < world_size and time.monotonic() < deadline:
            time.sleep(0.05)
    except (RuntimeError, ValueError, KeyError, OSError):  # no store to meet in: leave now
        return


def set_gradient_sync(model: torch.nn.Module, enabled: bool) -> None:
    """Skip the gradient reduction (DDP's all-reduce, FSDP's reduce-scatter) on non-final micro-steps of
    gradient accumulation; FSDP then accumulates unsharded gradients locally until the final micro-step.

    We flip the flag that `DDP.no_sync()` flips rather than use the context manager, so that the loop need not
    wrap the final micro-step differently from the others (the same trick as nanoGPT).
    """
    from torch.distributed.fsdp import FSDPModule

    if isinstance(model, torch.nn.parallel.DistributedDataParallel):
        model.require_backward_grad_sync = enabled
    elif isinstance(model, FSDPModule):
        model.set_requires_gradient_sync(enabled)


def backward(accelerator, loss: torch.Tensor, last_micro_step: bool) -> None:
    """Backward of one micro-step; the gradient sync flag (`set_gradient_sync`) was set before the forward.

    Under DeepSpeed the engine accumulates and reduces itself, at the boundary we mark; it clips and steps in
    `step_deepspeed_engine`. It would also divide the loss by the accumulation steps; that is switched off (`scale_wrt_gas`)
    because the loss is already normalised by the item count of the whole step, exactly as under DDP.
    """
    if uses_deepspeed(accelerator):
        engine = accelerator.deepspeed_engine_wrapped.engine
        engine.set_gradient_accumulation_boundary(is_boundary=last_micro_step)
        engine.backward(loss, scale_wrt_gas=False)
    else:
        accelerator.backward(loss)


def step_deepspeed_engine(accelerator) -> None:
    """Under DeepSpeed: the engine's step (clipping, optimizer update, zeroed gradients); a no-op elsewhere.

    accelerate's `DeepSpeedEngineWrapper.backward` runs `engine.backward` and, at the accumulation boundary,
    `engine.step` in one call, which leaves no point where the step's reduced gradients can be changed before the
    update. `backward` above runs the same `engine.backward`; the engine calls this after the hooks that sit
    between the backward passes and the update (`Task.before_optimizer_step`, EWC's penalty gradient).
    """
    if uses_deepspeed(accelerator):
        accelerator.deepspeed_engine_wrapped.engine.step()


def clip_gradients(accelerator, model, max_norm: float):
    """Clip to `max_norm` and return the gradient norm, a device tensor read only when logged.

    Under DeepSpeed the engine clipped in its step (at the boundary `backward` marks); its norm is read from the
    DeepSpeed engine itself, because accelerate's `clip_grad_norm_` turns it into a float: a device sync per step.
    """
    if uses_deepspeed(accelerator):
        return model.get_global_grad_norm()
    return accelerator.clip_grad_norm_(model.parameters(), max_norm)


# ------------------------------------------------------------------------------ parameters, rank by rank
# What each rank holds of a parameter and of its gradient, for code that works on parameters directly (EWC):
# - one process, DDP: the whole parameter and its (synced) `.grad`;
# - FSDP2: a DTensor whose local shard (`to_local`) is this rank's piece, and a DTensor gradient sharded alike;
# - DeepSpeed ZeRO-3: a flat fp32 partition of the padded, flattened parameter (the optimizer's master copy), read
#   and written through deepspeed.utils' local API (safe_get_local_fp32_param, safe_get/set_local_grad);
# - DeepSpeed ZeRO-1/2: the whole parameter, but the reduced gradient lives in the optimizer's flat partitions:
#   deepspeed.utils' safe_get_full_grad assembles it (an all-reduce per parameter) and safe_set_full_grad writes
#   back each rank's own fragment.
def zero3_partitioned(accelerator) -> bool:
    return uses_deepspeed(accelerator) and accelerator.deepspeed_plugin.zero_stage == 3


def parameters_whole_on_every_rank(accelerator) -> bool:
    """One process, DDP, ZeRO-1/2: every rank holds every parameter whole (and identical), not a shard of it."""
    return not (zero3_partitioned(accelerator) or uses_fsdp(accelerator))


def local_values(accelerator, parameter: torch.nn.Parameter) -> torch.Tensor:
    """This rank's piece of `parameter`, detached: all of it, its FSDP2 shard or its ZeRO-3 fp32 partition (under
    ZeRO-1/2 with bf16 the module's bf16 copy: the fp32 master weights are partitioned)."""
    if zero3_partitioned(accelerator):
        from deepspeed.utils import safe_get_local_fp32_param

        return safe_get_local_fp32_param(parameter)
    values = parameter.detach()
    return values.to_local() if uses_fsdp(accelerator) else values


def local_part(accelerator, parameter: torch.nn.Parameter, full: torch.Tensor) -> torch.Tensor:
    """The piece of `full` (a tensor shaped like the whole parameter) that `local_values` covers on this rank; no
    communication (every rank has `full`)."""
    if zero3_partitioned(accelerator):
        # ZeRO-3 pads the flattened parameter to world size x partition size; rank r holds slice r.
        size = parameter.ds_tensor.numel()
        rank = dist.get_rank(group=parameter.ds_process_group)
        flat = torch.nn.functional.pad(full.flatten(), (0, size * dist.get_world_size(parameter.ds_process_group)
                                                        - full.numel()))
        return flat[rank * size:(rank + 1) * size].clone()
    if uses_fsdp(accelerator):
        from torch.distributed.tensor import distribute_tensor

        return distribute_tensor(full, parameter.device_mesh, parameter.placements, src_data_rank=None).to_local()
    return full


def add_to_local_gradient(accelerator, parameter: torch.nn.Parameter, delta: torch.Tensor) -> bool:
    """Add `delta` (shaped like `local_values`) to this rank's piece of the step's reduced gradient. False where the
    parameter has no gradient this step (frozen, or masked by `Task.before_optimizer_step`)."""
    if zero3_partitioned(accelerator):
        from deepspeed.utils import safe_get_local_grad, safe_set_local_grad

        gradient = safe_get_local_grad(parameter) if parameter.requires_grad else None
        if gradient is not None:
            safe_set_local_grad(parameter, gradient + delta.to(gradient.dtype))
        return gradient is not None
    if uses_deepspeed(accelerator):  # ZeRO-1/2: whole parameters, gradients in the optimizer's partitions
        from deepspeed.utils import safe_get_full_grad, safe_set_full_grad

        gradient = safe_get_full_grad(parameter) if parameter.requires_grad else None
        if gradient is not None:
            safe_set_full_grad(parameter, gradient + delta.to(gradient.dtype))
        return gradient is not None
    if parameter.grad is None:
        return False
    gradient = parameter.grad.to_local() if uses_fsdp(accelerator) else parameter.grad
    gradient.add_(delta.to(gradient.dtype))
    return True


def gather_full_parameters(accelerator, named_parameters) -> dict[str, torch.Tensor]:
    """{name: the whole parameter, detached, fp32 master weights under DeepSpeed} on EVERY rank, from
    (name, prepared parameter) pairs: a collective per parameter under ZeRO-3 and FSDP2 (every rank calls it with
    the same parameters in the same order); a clone elsewhere."""
    full = {}
    for name, parameter in named_parameters:
        if uses_deepspeed(accelerator):
            from deepspeed.utils import safe_get_full_fp32_param

            full[name] = safe_get_full_fp32_param(parameter).detach().clone()
        elif uses_fsdp(accelerator):
            full[name] = parameter.detach().full_tensor()
        else:
            full[name] = parameter.detach().clone()
    return full


def end_processes() -> None:
    """Tear the process group down at the end of a run (NCCL otherwise warns that destroy_process_group() was not
    called and may leak resources)."""
    global _host_group
    if is_distributed():
        dist.destroy_process_group()
    _host_group = None


def full_state_dict(accelerator, model, submodule: torch.nn.Module) -> dict | None:
    """The complete weights of `submodule` (on rank 0) under DeepSpeed or FSDP; None elsewhere, where its own
    parameters are complete.

    Every rank must call this: under ZeRO-3 and FSDP each holds a shard and the gather is a collective.
    """
    if sharded_state_name(accelerator) is None:
        return None
    state = accelerator.get_state_dict(model)
    if not accelerator.is_main_process:  # the gather delivers to rank 0 only
        return None
    prefix = next(name for name, module in accelerator.unwrap_model(model).named_modules() if module is submodule)
    prefix = f"{prefix}." if prefix else ""
    state = {key[len(prefix):]: value for key, value in state.items() if key.startswith(prefix)}
    return with_tied_weights_shared(state, submodule)


def with_tied_weights_shared(state: dict, model: torch.nn.Module) -> dict:
    """FSDP's gather gives each name of a tied weight (the MLM decoder tied to the word embeddings) its own copy;
    point the copies back at one tensor, so that `save_pretrained` stores it once, as it does for a plain model."""
    tied = model.get_expanded_tied_weights_keys() if hasattr(model, "get_expanded_tied_weights_keys") else {}
    return {**state, **{copy: state[source] for copy, source in tied.items() if copy in state and source in state}}


def sharded_state_name(accelerator) -> str | None:
    """Under DeepSpeed and FSDP every rank holds a shard of the optimizer state (and under ZeRO-3 and FSDP of the
    weights), so checkpoints are sharded: "deepspeed" or "fsdp" names the kind (and the checkpoint's
    subdirectory). None under DDP, where rank 0 holds everything."""
    if uses_deepspeed(accelerator):
        return "deepspeed"
    return "fsdp" if uses_fsdp(accelerator) else None


def uses_fsdp(accelerator) -> bool:
    from accelerate.utils import DistributedType

    return accelerator.distributed_type == DistributedType.FSDP


def save_fsdp_checkpoint(model, optimizer, directory: str) -> None:
    """torch.distributed.checkpoint of model and optimizer into `directory`: every rank writes its own shards."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optimizer_state = get_state_dict(model, unwrap_optimizer(optimizer))
    dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=directory)


def load_fsdp_checkpoint(model, optimizer, directory: str) -> None:
    """Every rank reads back its shards (into state dicts of the current sharding, so the layout may differ)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    require(os.path.isfile(os.path.join(directory, ".metadata")), f"no FSDP checkpoint in {directory}")
    optimizer = unwrap_optimizer(optimizer)
    model_state, optimizer_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optimizer": optimizer_state}
    dcp.load(state, checkpoint_id=directory)
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])


def unwrap_optimizer(optimizer) -> torch.optim.Optimizer:
    """The torch optimizer inside accelerate's wrapper: the state-dict helpers step it once to create its state,
    which must not go through the wrapper's gradient-accumulation bookkeeping."""
    return getattr(optimizer, "optimizer", optimizer)


def save_deepspeed_checkpoint(model, optimizer, directory: str, tag: str = "deepspeed") -> None:
    """DeepSpeed's sharded checkpoint under `directory/tag`: every rank writes its own model/optimizer shards
    (the DeepSpeed engine `model` holds the optimizer; `optimizer` is there for the signature FSDP's needs)."""
    model.save_checkpoint(directory, tag=tag)


def load_deepspeed_checkpoint(model, optimizer, directory: str, tag: str = "deepspeed") -> None:
    """Every rank reads back its shards; a missing or foreign checkpoint is an error, not a silent fresh start."""
    path, _ = model.load_checkpoint(directory, tag=tag, load_module_strict=True)
    require(path is not None, f"no DeepSpeed checkpoint '{tag}' in {directory}")


def sharded_checkpoint_functions(accelerator):
    """(save, load) of this run's sharded checkpoint, each called as f(model, optimizer, directory) on every rank."""
    kind = sharded_state_name(accelerator)
    require(kind is not None, "sharded state is only saved and loaded under DeepSpeed or FSDP")
    return {"deepspeed": (save_deepspeed_checkpoint, load_deepspeed_checkpoint),
            "fsdp": (save_fsdp_checkpoint, load_fsdp_checkpoint)}[kind]


class GlobalBatchSampler:
    """Shards one global sample order across ranks: the same samples per optimizer step at every world size.

    Epoch `e` visits `randperm(len(dataset))` seeded by `seed + e`. Optimizer step `s` of the epoch takes the
    `global_batch_size = per_device_batch * world_size * accumulation` samples at positions
    `[s * global_batch_size, (s + 1) * global_batch_size)`; micro-step `m` gives rank `r` the
    `per_device_batch` samples at offset `(m * world_size + r) * per_device_batch` inside it. The samples of
    an incomplete final global batch are dropped, so 1 process x batch 16 and 2 processes x batch 4 x
    accumulation 2 see exactly the same samples in every step. Positions are counted in samples, so a
    resumed run may change world size and still continue the same order.

    With `lengths` (one per sample), batches are length-grouped: see `group_by_length`. The grouping works on
    the global order alone, so it keeps every property above.

    With `replay` (trainer.replay), each global batch holds `replay_per_step` samples of the replay stream (indices
    after the dataset's) and `new_per_step` of the epoch's order, which then advances by `new_per_step` a step;
    the global batch is composed before it is sharded, so the properties above hold with replay too.
    """

    def __init__(self, dataset_size: int, per_device_batch_size: int, world_size: int, rank: int,
                 accumulation_steps: int, seed: int, shuffle: bool = True, lengths=None, replay=None):
        self.dataset_size = dataset_size
        self.per_device_batch_size = per_device_batch_size
        self.world_size = world_size
        self.rank = rank
        self.accumulation_steps = accumulation_steps
        self.seed = seed
        self.shuffle = shuffle
        self.lengths = None if lengths is None else torch.as_tensor(lengths)  # replay samples' lengths after
        self.replay = replay
        self.replay_per_step = 0 if replay is None else replay_count(replay.ratio, self.global_batch_size)
        self.epoch = 0
        self.start_sample = 0  # position in the epoch's global order where iteration starts

    @property
    def global_batch_size(self) -> int:
        return self.per_device_batch_size * self.world_size * self.accumulation_steps

    @property
    def new_per_step(self) -> int:
        """Samples of the dataset (not of the replay stream) in each global batch."""
        return self.global_batch_size - self.replay_per_step

    @property
    def steps_per_epoch(self) -> int:
        return self.dataset_size // self.new_per_step

    def epoch_order(self, epoch: int) -> torch.Tensor:
        if not self.shuffle:
            return torch.arange(self.dataset_size)
        order = torch.randperm(self.dataset_size, generator=torch.Generator().manual_seed(self.seed + epoch))
        if self.lengths is not None:
            order = group_by_length(order, self.lengths, self.new_per_step, seed=self.seed + epoch)
        return order

    def remaining_steps(self, start_sample: int) -> int:
        """Optimizer steps left in an epoch from position `start_sample` of its order."""
        return (self.steps_per_epoch * self.new_per_step - start_sample) // self.new_per_step

    def __len__(self) -> int:
        """Micro-batches this rank yields in the current epoch."""
        return self.remaining_steps(self.start_sample) * self.accumulation_steps

    def __iter__(self):
        return self.batches(self.epoch, self.start_sample)

    def batches(self, epoch: int, start_sample: int = 0, replay_position: int = 0):
        """This rank's micro-batches (index lists) of `epoch`, from position `start_sample` of its global order
        (and `replay_position` of the replay stream)."""
        order = self.epoch_order(epoch)
        micro, new = self.per_device_batch_size, self.new_per_step
        for step in range(self.remaining_steps(start_sample)):
            step_start = start_sample + step * new
            batch = order[step_start:step_start + new]
            if self.replay is not None:
                replayed = self.replay.indices(replay_position + step * self.replay_per_step, self.replay_per_step)
                batch = mixed_global_batch(batch, replayed, self.lengths)
            for micro_step in range(self.accumulation_steps):
                start = (micro_step * self.world_size + self.rank) * micro
                yield batch[start:start + micro].tolist()


def group_by_length(order: torch.Tensor, lengths: torch.Tensor, global_batch_size: int, seed: int,
                    batches_per_group: int = 50) -> torch.Tensor:
    """Reorder a shuffled epoch so that each batch holds samples of similar length (less padding).

    The shuffled order is cut into mega-chunks of `batches_per_group` global batches; each chunk is sorted by
    length (longest first, stable), then its global batches are shuffled among themselves so that steps do not
    run long-to-short in a saw-tooth. Every micro-batch is a contiguous slice of a sorted global batch, so it is
    length-homogeneous too. Only the global batch size enters (never the per-device batch or world size), so
    step `s` gets the same samples on 1 or N processes; a fresh permutation per epoch keeps epochs different.
    """
    generator = torch.Generator().manual_seed(seed)
    chunk = global_batch_size * batches_per_group
    grouped = []
    for start in range(0, len(order), chunk):
        part = order[start:start + chunk]
        part = part[torch.argsort(lengths[part], descending=True, stable=True)]
        whole = (len(part) // global_batch_size) * global_batch_size  # the ragged tail stays last (dropped)
        batches = part[:whole].view(-1, global_batch_size)
        batches = batches[torch.randperm(len(batches), generator=generator)]
        grouped.extend([batches.reshape(-1), part[whole:]])
    return torch.cat(grouped)


def shard_for_evaluation(dataset_size: int, world_size: int, rank: int) -> range:
    """A contiguous, disjoint slice of the evaluation set per rank: every sample counted exactly once."""
    per_rank, extra = divmod(dataset_size, world_size)
    start = rank * per_rank + min(rank, extra)
    return range(start, start + per_rank + (1 if rank < extra else 0))


_host_group = None


def host_group():
    """A gloo group over all ranks for reductions of host values: under NCCL a tiny host-side collective, with no
    device copy and no GPU synchronisation. Created on first use, which every rank reaches at the same step."""
    global _host_group
    if _host_group is None:
        _host_group = dist.new_group(backend="gloo")
    return _host_group


def host_sum(value: int) -> int:
    """The sum over ranks of a count every rank knows on the host (e.g. the loss items of a step)."""
    if not is_distributed():
        return value
    tensor = torch.tensor([value], dtype=torch.int64)
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=host_group())
    return int(tensor.item())


def any_rank(flag: bool) -> bool:
    """True on every rank if `flag` is True on any rank: how all ranks agree to stop at the same step (over the
    host group, see `host_group`)."""
    if not is_distributed():
        return flag
    tensor = torch.tensor([int(flag)], dtype=torch.int32)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX, group=host_group())
    return bool(tensor.item())
