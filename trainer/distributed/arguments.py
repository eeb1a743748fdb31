"""The precision and parallelism section of the command line: autocast, DeepSpeed, devices, compilation,
loader workers, and the peak MFU divides by."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

from trainer.config.parsing import arg
from trainer.errors import require


@dataclass
class ParallelismArguments:
    _argument_group_name = "precision and parallelism"

    bf16: bool = arg(False, "bfloat16 autocast (CPU and GPU).")
    fp16: bool = arg(False, "float16 autocast with loss scaling (GPU only).")
    tf32: Optional[bool] = arg(None, "TF32 tensor cores for float32 matrix products and convolutions on a CUDA GPU "
                                     "(torch.backends.cuda.matmul / cudnn allow_tf32). Unset: on wherever a GPU "
                                     "trains; false: full float32; true on a CPU run is an error.")
    dataloader_num_workers: Optional[int] = arg(
        None, "Data loading worker processes per rank. Unset: none on the CPU; on a GPU up to 4 (the cores per "
        "process less one), so that masking and collation run beside the training process.")
    ddp_timeout: int = arg(10800, "Seconds a collective may wait, e.g. while rank 0 tokenizes a big corpus.")
    use_cpu: bool = arg(False, "Train on the CPU even if a GPU is present.")
    torch_compile: bool = arg(False, "Compile the model's transformer blocks with torch.compile, one by one, on "
                                     "fixed shapes (see trainer/models/compilation.py). Compilation takes a minute or "
                                     "more up front; it pays on long GPU runs.")
    torch_compile_backend: str = arg("inductor", "torch.compile backend with --torch_compile (e.g. inductor, "
                                                 "aot_eager for debugging).")
    torch_compile_mode: str = arg("default", "torch.compile mode with --torch_compile: default, reduce-overhead "
                                             "(CUDA graphs: fewer kernel launches), max-autotune (also searches "
                                             "matrix-product kernels; long compile), max-autotune-no-cudagraphs.",
                                  choices=["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"])
    peak_tflops: Optional[float] = arg(None, "The device's peak TFLOP/s that MFU divides by. Unset: the datasheet "
                                             "dense peak for the GPU and precision (e.g. 989.5 for an H100 SXM in "
                                             "bf16); on a device without one (a CPU), a measured matrix-product rate.")
    local_rank: int = arg(-1, "Passed by the `deepspeed` launcher as --local_rank=N; accepted and ignored (the "
                              "LOCAL_RANK environment variable it also sets is what counts).")
    deepspeed: Optional[str] = arg(None, "DeepSpeed config JSON (e.g. ds_configs/zero2.json): train with DeepSpeed "
                                         "ZeRO. Its \"auto\" values are filled from these arguments.")
    estimate_memory: bool = arg(False, "Print the memory plan per process (parameters, gradients, optimizer state, "
                                       "activations, for this backend, world size, precision and batch) and exit, "
                                       "without building the model or reading data; writes nothing. The world size "
                                       "is the launcher's (WORLD_SIZE=8 python -m ... plans for 8 processes).")
    skip_memory_check: bool = arg(False, "Start even when the memory plan exceeds the GPU's free memory (for when "
                                         "the estimate is wrong); the plan is still logged.")

    def __post_init__(self):
        require(self.ddp_timeout > 0, f"--ddp_timeout must be positive, got {self.ddp_timeout}")
        require(not (self.bf16 and self.fp16), "choose one of --bf16 and --fp16")
        require(self.dataloader_num_workers is None or self.dataloader_num_workers >= 0,
                "--dataloader_num_workers must be >= 0")
        require(self.deepspeed is None or os.path.isfile(self.deepspeed), f"--deepspeed {self.deepspeed}: no such file")

    @property
    def mixed_precision(self) -> str:
        return "bf16" if self.bf16 else "fp16" if self.fp16 else "no"
