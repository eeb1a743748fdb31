"""Process start-up and backends: the Accelerator and its DeepSpeed/FSDP plugins, process groups, CPU threads.

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

import datetime
import logging
import os
import sys
import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist

from trainer.distributed.deepspeed_config import (fill_hidden_size_values, load_deepspeed_config,
                                                  resolve_deepspeed_config)
from trainer.errors import require
from trainer.layout import DEEPSPEED_STATE_DIR, FSDP_STATE_DIR
from trainer.models.blocks import repeated_blocks


def make_accelerator(parallelism, optimization, **plugins):
    """The accelerate Accelerator for the precision and parallelism section (and, under DeepSpeed, the
    optimization section, whose values fill its config)."""
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs

    require(not (parallelism.fp16 and not torch.cuda.is_available()),
            "--fp16 needs a GPU (float16 autocast and loss scaling are CUDA features here); use --bf16 on the CPU")
    use_cpu = parallelism.use_cpu or not torch.cuda.is_available()
    timeout = datetime.timedelta(seconds=parallelism.ddp_timeout)
    if "TORCHELASTIC_RESTART_COUNT" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        init_process_group_per_restart("gloo" if use_cpu else "nccl", timeout)
    require(not (parallelism.tf32 and use_cpu), "--tf32 needs a CUDA GPU (TF32 is a tensor-core format) and this run "
                                                "is on the CPU; drop --tf32 or pass --tf32 false")
    if not use_cpu:
        # TF32 tensor cores for fp32 matrix products: ~8x the fp32 rate on Ampere+ at 10-bit mantissa inputs,
        # the precision every mixed-precision recipe already accepts. On unless --tf32 false.
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = parallelism.tf32 is not False
    deepspeed_plugin = make_deepspeed_plugin(parallelism, optimization, timeout)
    if deepspeed_plugin is not None:
        # Only under DeepSpeed: elsewhere accelerate would divide every loss by it in `backward`.
        plugins.update(deepspeed_plugin=deepspeed_plugin,
                       gradient_accumulation_steps=optimization.gradient_accumulation_steps)
    accelerator = Accelerator(
        # accelerate turns DeepSpeed off when told cpu=True; DeepSpeed brings its own CPU backend (gloo).
        cpu=deepspeed_plugin is None and use_cpu,
        dynamo_backend="no",  # --torch_compile compiles the blocks (trainer.models.compilation), not the whole model
        mixed_precision=parallelism.mixed_precision,
        kwargs_handlers=[InitProcessGroupKwargs(timeout=timeout, **process_group_backend(deepspeed_plugin))],
        **plugins,
    )
    if deepspeed_plugin is None:
        unwrapping_without_deepspeed()
        quiet_deepspeed_accelerator_warning()
    else:
        without_zero_init()
    if use_cpu:  # after Accelerator(), which sets its own count for several CPU processes
        share_cpu_cores(int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    if fsdp_requested() and use_cpu:
        use_fsdp_on_cpu(accelerator, parallelism)
    return accelerator


def unwrapping_without_deepspeed() -> None:
    """Keep `accelerator.unwrap_model` from importing DeepSpeed in runs that do not use it.

    accelerate 1.16's `extract_model_from_parallel` imports DeepSpeed wherever it is installed, to check whether the
    model is a DeepSpeedEngine: 3-4 s of CPU in every process of every run, at its first evaluation or save. A
    DeepSpeedEngine can only exist once its module is imported, so that check asks whether it is."""
    from accelerate.utils import other

    other.is_deepspeed_available = deepspeed_imported


def deepspeed_imported() -> bool:
    return "deepspeed.runtime.engine" in sys.modules  # DeepSpeedEngine's module


def quiet_deepspeed_accelerator_warning() -> None:
    """Drop DeepSpeed's "Setting accelerator to CPU ..." warning in runs that do not use DeepSpeed.

    Where DeepSpeed is installed, libraries may import it (accelerate's `unwrap_model` did until
    `unwrapping_without_deepspeed`), and DeepSpeed's first `get_accelerator()` logs that warning on every machine
    without CUDA. The filter sits on DeepSpeed's own logger, so it also catches the imports that come later;
    DeepSpeed runs keep the warning.
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


def use_fsdp_on_cpu(accelerator, parallelism) -> None:
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
    if parallelism.mixed_precision != "no":
        plugin.set_mixed_precision(parallelism.mixed_precision)
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


def deepspeed_requested(parallelism) -> bool:
    """`--deepspeed PATH`, or `accelerate launch` with a DeepSpeed config (it says so in the environment)."""
    return bool(parallelism.deepspeed) or os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"


def make_deepspeed_plugin(parallelism, optimization, timeout: datetime.timedelta):
    """accelerate's DeepSpeedPlugin with a config whose "auto" values all come from the command line.

    Under `accelerate launch` the plugin accelerate would build from its environment is the starting point
    (its `deepspeed_config_file`, or the ZeRO fields of the YAML); `--deepspeed PATH` wins over it.
    """
    if not deepspeed_requested(parallelism):
        return None
    from accelerate.utils import DeepSpeedPlugin

    config = requested_deepspeed_config(parallelism, optimization, default_single_process_environment())
    start_deepspeed_process_group(timeout)
    return DeepSpeedPlugin(hf_ds_config=config, zero3_init_flag=False)  # see `without_zero_init`


def requested_deepspeed_config(parallelism, optimization, world_size: int) -> dict:
    """The DeepSpeed config asked for (`--deepspeed PATH`, else accelerate's), every "auto" filled and checked."""
    from accelerate.utils import DeepSpeedPlugin

    if parallelism.deepspeed:
        source = f"--deepspeed {parallelism.deepspeed}"
        config = load_deepspeed_config(parallelism.deepspeed)
    else:
        source = "the accelerate DeepSpeed config"
        config = DeepSpeedPlugin().deepspeed_config
    return resolve_deepspeed_config(config, optimization, parallelism, world_size, source)


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
    be one FSDP unit. Name the Hugging Face model's blocks instead: the class of its repeated blocks (BertLayer,
    GPT2Block, LlamaDecoderLayer: models/blocks.py), so one YAML serves every model. Not the model's own
    `_no_split_modules`: BERT's also holds BertEmbeddings, whose word embeddings are tied to the MLM decoder in the
    root unit."""
    from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy

    policy = getattr(plugin.auto_wrap_policy, "func", plugin.auto_wrap_policy)
    if policy is not transformer_auto_wrap_policy or plugin.transformer_cls_names_to_wrap:
        return
    blocks = repeated_blocks(hf_model)
    names = [type(blocks[0]).__name__] if blocks is not None else []
    plugin.transformer_cls_names_to_wrap = names or list(getattr(hf_model, "_no_split_modules", None) or [])


def parameters_sharded(accelerator) -> bool:
    """Under ZeRO-3 (and FSDP) each rank holds a shard of every weight: a forward is a collective that all
    ranks must run together, so nothing may run the model on rank 0 alone."""
    zero3 = uses_deepspeed(accelerator) and accelerator.deepspeed_plugin.zero_stage == 3
    return zero3 or uses_fsdp(accelerator)


@dataclass(frozen=True)
class HostProcesses:
    """This process's place among those of a job that runs on the host alone (trainer.prepare), with the names
    `main_process_first` reads of an Accelerator."""

    process_index: int
    num_processes: int
    local_process_index: int

    @property
    def is_main_process(self) -> bool:
        return self.process_index == 0

    @property
    def is_local_main_process(self) -> bool:
        return self.local_process_index == 0


def start_host_processes(timeout: datetime.timedelta) -> HostProcesses:
    """Under a launcher, the processes joined in a gloo group (under torchrun on a fresh store prefix per restart,
    see the module's docstring); no accelerate state, which a later job in the same process would inherit."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size > 1 and not dist.is_initialized():
        if "TORCHELASTIC_RESTART_COUNT" in os.environ:
            init_process_group_per_restart("gloo", timeout)
        else:
            dist.init_process_group("gloo", timeout=timeout)
    return HostProcesses(int(os.environ.get("RANK", "0")), world_size, int(os.environ.get("LOCAL_RANK", "0")))


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


def sharded_state_name(accelerator) -> str | None:
    """Under DeepSpeed and FSDP every rank holds a shard of the optimizer state (and under ZeRO-3 and FSDP of the
    weights), so checkpoints are sharded: "deepspeed" or "fsdp" names the kind (and the checkpoint's
    subdirectory). None under DDP, where rank 0 holds everything."""
    if uses_deepspeed(accelerator):
        return DEEPSPEED_STATE_DIR
    return FSDP_STATE_DIR if uses_fsdp(accelerator) else None


def uses_fsdp(accelerator) -> bool:
    from accelerate.utils import DistributedType

    return accelerator.distributed_type == DistributedType.FSDP


