"""The memory plan: the bytes each process needs to train, worked out before the first step from the model's config
(the model built on the meta device, so without any weights) and the command line.

`plan_memory(model, training)` is a pure function of what it is given (`ModelShape`: the model's parameters and
sizes; `Training`: backend, world size, precision, optimizer, checkpointing, batch), as is the fit check
`fitting_changes(plan, capacity)`, which recomputes the plan for each flag that could make it fit. Start-up logs the
plan (engine/jobs.py `plan_before_start`); `--estimate_memory` prints it and exits (`estimate_memory`); on a GPU a
plan above the free device memory is a one-line error naming those flags (`check_fits`), unless
`--skip_memory_check`.

What is counted, per process (the figures of ZeRO, Rajbhandari et al. 2020, "ZeRO: Memory Optimizations Toward
Training Trillion Parameter Models", section 3, for this engine's choices):
- parameters: numel x the weights' dtype (--torch_dtype); under DeepSpeed with --bf16/--fp16 the module is cast to
  16 bits. ZeRO-3: each parameter's ceil(numel / world) (DeepSpeed pads each partition), except those below
  stage3_param_persistence_threshold, which every process keeps whole. FSDP2: each parameter's ceil(dim 0 / world)
  rows (fully_shard pads dim 0 to a multiple of the world size).
- master weights: DeepSpeed always keeps an fp32 copy of its partition (ZeRO-1/2: ceil(numel / 2 world) x 2, its
  alignment of the flat groups to 2 x world elements; ZeRO-3 the per-parameter partition above). Elsewhere the
  optimizer updates the parameters themselves (float32 unless --torch_dtype says otherwise).
- gradients: one per trainable element in the parameters' dtype; DDP adds its reducer buckets (a second copy:
  accelerate keeps gradient_as_bucket_view off); ZeRO-1 keeps them whole plus the fp32 partition, ZeRO-2/3 only the
  fp32 partition plus one reduce bucket; FSDP2 the sharded gradient.
- optimizer state: `OPTIMIZER_STATE[--optim]` of the tensors the optimizer updates (flat 1-D partitions under ZeRO).
- activations: `layer_activation_bytes` per token and layer (below), one layer more for the backward's gradients
  of a block's saved tensors, the head's (`head_bytes`), and under autocast the bf16 copies of the weights that
  autocast caches for the forward.
- working set: ZeRO-3's gathered parameters (one block and the largest other module), FSDP2's unsharded root module
  (embeddings, head) and two blocks (the one running and the one prefetched), their unsharded gradients.
With --offload_optimizer (DeepSpeed config) the optimizer state, master weights and fp32 gradient partition live in
host memory; with offload_param, the parameter partition too: `MemoryPlan.host` holds them.

The peak: the persistent parts, the working set, and activations and gradients: gradients are set to None after
each step and arise in the backward as the activations are freed, so with one micro-step the larger of the two
counts; with accumulation the gradients of the earlier micro-steps wait through the next forward, so both count.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Callable, Optional

GIB = 2 ** 30
DEEPSPEED_DEFAULT_BUCKET = 500_000_000  # DeepSpeed's reduce_bucket_size when a config leaves it out
DEEPSPEED_DEFAULT_PERSISTENCE = 100_000  # DeepSpeed's stage3_param_persistence_threshold when left out


def numel(shape) -> int:
    return math.prod(shape)


def elementwise(states: int) -> Callable:
    """`states` tensors the size of each parameter, in the dtype of the tensor updated (AdamW: exp_avg and
    exp_avg_sq; SGD with momentum: its buffer)."""
    return lambda shapes, element_bytes: states * element_bytes * sum(numel(shape) for shape in shapes)


def factored_second_moment(shapes, element_bytes: int) -> int:
    """transformers' Adafactor without a first moment (beta1 None, the Trainer's setting): a matrix [..., r, c] keeps
    row and column statistics (shape[:-1] and shape[:-2] + shape[-1:]), a vector its full second moment."""
    total = 0
    for shape in shapes:
        total += (numel(shape[:-1]) + numel(shape[:-2]) * shape[-1]) if len(shape) >= 2 else numel(shape)
    return total * element_bytes


def block_quantized_moments(bits: int, block_size: int) -> Callable:
    """torchao's low-bit AdamW (engine/optim.py quantized_adamw): the two moments of a tensor of at least 4096
    values that its block size divides kept as `bits`-bit codes with one fp32 scale per block and a code book of
    2**bits fp32 values; the moments of the other tensors in fp32 (torchao.optim's `_new_buffer` rule)."""

    def state_bytes(shapes, element_bytes: int) -> int:
        total = 0
        for shape in shapes:
            count = numel(shape)
            if count >= 4096 and count % block_size == 0:
                total += 2 * (count * bits // 8 + 4 * (count // block_size) + 4 * 2 ** bits)
            else:
                total += 2 * 4 * count
        return total

    return state_bytes


# --optim -> (shapes of the tensors it updates, their element size in bytes) -> bytes of optimizer state.
# A new --optim in engine/optim.py adds its line here (tests/test_memory_plan.py checks that every one has it).
OPTIMIZER_STATE: dict[str, Callable] = {
    "adamw_torch_fused": elementwise(2),
    "adamw_torch": elementwise(2),
    "adafactor": factored_second_moment,
    "sgd": elementwise(0),  # momentum 0: torch keeps no buffer
    "adamw_torch_8bit": block_quantized_moments(8, block_size=256),  # torchao.optim.AdamW8bit's defaults
    "adamw_torch_4bit": block_quantized_moments(4, block_size=128),  # torchao.optim.AdamW4bit's
}


@dataclass(frozen=True)
class Head:
    """The job's output layer as the plan counts it. kind: "fused" (clm's chunked output layer + loss,
    models/fused_loss.py: never all the logits), "logits" (the model's own logits at every position, the loss on
    `rows_per_token` of them: clm with --loss_chunk_tokens 0, MLM on other architectures), "rows" (the head on
    `rows_per_token` of the positions only: MLM's masked rows, models/sparse_mlm.py)."""

    kind: str
    rows_per_token: float = 1.0
    chunk_tokens: int = 0


@dataclass(frozen=True)
class ModelShape:
    """What the plan needs of the model: from its config and a meta-device build (`model_shape`)."""

    trainable_shapes: tuple  # shapes of the trainable parameters
    frozen_numel: int  # elements of the other parameters
    weight_bytes: int  # element size of the weights (--torch_dtype)
    layers: int
    layer_numel: int  # parameters of one repeated block
    largest_other_numel: int  # the largest parameter outside the blocks (the embedding, an untied head)
    hidden: int
    heads: int
    query_hidden: int  # heads x head dimension (the hidden size unless a config sets head_dim apart)
    kv_hidden: int  # key-value heads x head dimension (grouped-query attention)
    intermediate: int
    vocab: int
    gated_mlp: bool  # SwiGLU-style: gate and up projections (Llama, Qwen, Mistral)
    rms_norm: bool  # transformers' Python RMSNorm keeps its input and the normalised copy
    separate_qkv: bool  # q, k, v projections apart (each reads the norm's output)
    attention_dropout: bool
    hidden_dropout: bool
    eager_attention: bool
    head: Head = Head("fused")

    @property
    def trainable_numel(self) -> int:
        return sum(numel(shape) for shape in self.trainable_shapes)

    @property
    def numel(self) -> int:
        return self.trainable_numel + self.frozen_numel


@dataclass(frozen=True)
class Training:
    """How the model is trained, as far as memory goes. backend: "single", "ddp", "zero" (DeepSpeed ZeRO) or
    "fsdp2"."""

    backend: str = "single"
    world_size: int = 1
    zero_stage: int = 0
    offload_optimizer: bool = False
    offload_parameters: bool = False
    reduce_bucket: int = DEEPSPEED_DEFAULT_BUCKET  # elements
    persistence_threshold: int = DEEPSPEED_DEFAULT_PERSISTENCE  # elements
    optim: str = "adamw_torch_fused"
    mixed_precision: str = "no"  # "bf16", "fp16"
    gradient_checkpointing: bool = False
    checkpoint_every: int = 1  # --gradient_checkpointing_every
    batch_size: int = 8
    sequence_length: int = 128
    accumulation: int = 1
    device: str = "cpu"

    def describe(self) -> str:
        kind = {"single": "a single process", "ddp": "DDP", "fsdp2": "FSDP2"}.get(
            self.backend, f"DeepSpeed ZeRO-{self.zero_stage}")
        offload = [name for name, on in (("optimizer", self.offload_optimizer), ("parameters", self.offload_parameters))
                   if on]
        return (f"{kind}{' (' + ', '.join(offload) + ' offloaded)' if offload else ''}"
                f"{'' if self.backend == 'single' else f' x {self.world_size} processes'}, --optim {self.optim}, "
                f"{self.mixed_precision if self.mixed_precision != 'no' else 'no mixed precision'}, "
                f"batch {self.batch_size} x {self.sequence_length}"
                f"{f' x {self.accumulation} micro-steps' if self.accumulation > 1 else ''}"
                f"{', gradient checkpointing' if self.gradient_checkpointing else ''}"
                f"{f' every {self.checkpoint_every} blocks' if self.checkpoint_every > 1 else ''}")


@dataclass(frozen=True)
class MemoryPlan:
    """Bytes per process on the training device (`host`: what offloading moves to host memory)."""

    model: ModelShape
    training: Training
    parameters: int
    master_weights: int
    gradients: int
    optimizer_state: int
    activations: int
    working_set: int
    host: int = 0
    buckets: int = 0  # DDP's reducer buckets (persistent)

    @property
    def peak(self) -> int:
        persistent = self.parameters + self.master_weights + self.optimizer_state + self.buckets + self.working_set
        moving = (self.activations + self.gradients if self.training.accumulation > 1
                  else max(self.activations, self.gradients))
        return persistent + moving

    def parts(self) -> dict[str, int]:
        return {"parameters": self.parameters, "master weights": self.master_weights,
                "gradients": self.gradients + self.buckets, "optimizer state": self.optimizer_state,
                "activations": self.activations, "working set": self.working_set}

    def parts_text(self) -> str:
        shown = ", ".join(f"{name} {gib(size)}" for name, size in self.parts().items() if size)
        return shown + (f"; host (offloaded) {gib(self.host)}" if self.host else "")

    def describe(self) -> str:
        """One line, e.g. "memory plan per process: peak 1.52 GiB (parameters 0.40 GiB, ...) for 106,000,000
        parameters, DDP x 2 processes, ..."."""
        return (f"memory plan per process: peak {gib(self.peak)} ({self.parts_text()}) for {self.model.numel:,} "
                f"parameters, {self.training.describe()}")


def gib(size: int) -> str:
    """A size for people: GiB from 1 GiB up, MiB below."""
    return f"{size / GIB:.2f} GiB" if size >= GIB else f"{size / 2 ** 20:.1f} MiB"


# ------------------------------------------------------------------------------------------------- activations
def activation_bytes(model: ModelShape, training: Training) -> tuple[int, int, int]:
    """(compute, residual, mask) element sizes. Autocast (single process or DDP, float32 weights, --bf16/--fp16)
    computes the matrix products in 16 bits but keeps the residual stream and norms in float32; DeepSpeed casts
    the module and FSDP2 gathers 16-bit weights, so everything is 16-bit there."""
    mixed = training.mixed_precision != "no"
    if not mixed:
        return model.weight_bytes, model.weight_bytes, model.weight_bytes
    if autocast_copies(model, training):
        return 2, 4, 2
    return 2, 2, 2


def autocast_copies(model: ModelShape, training: Training) -> bool:
    return (training.mixed_precision != "no" and model.weight_bytes == 4
            and training.backend in ("single", "ddp"))


def layer_activation_bytes(model: ModelShape, training: Training) -> float:
    """Bytes one transformer block keeps for its backward, per token.

    Derived from what autograd saves in a pre-norm block (counted with torch.autograd.graph.saved_tensors_hooks on
    transformers' GPT-2 and Llama, see tests/test_memory_plan.py; the same accounting as Korthikanti et al. 2022,
    "Reducing Activation Recomputation in Large Transformer Models", section 4.1, whose 34 s b h + 5 a s^2 b is
    GPT-3's block in 16 bits with dropout everywhere and attention probabilities stored). With h hidden, q and kv the
    query and key-value widths, I intermediate, a heads, s the sequence length, c the compute element size and r the
    residual's (float32 under autocast):
    - two norms: each its input (r h); RMSNorm also its normalised copy (r h);
    - the norms' outputs as the projections' input: one tensor (c h) each, but under autocast every projection
      saves its own 16-bit cast (q, k, v apart: 3; fused c_attn: 1; gate and up: 2; a plain MLP: 1);
    - attention: q and its output (2 q, the heads' width, h unless head_dim says otherwise), k and v (2 kv), in c (SDPA's fused kernels keep no probabilities);
    - MLP: gated 4 I (gate, up, act(gate), their product), plain 2 I (the up projection and its activation), in c
      (the engine runs tanh-GELU as one kernel, models/kernels.py);
    - dropout: a mask of its input's size and dtype per residual dropout (2 h); attention dropout on the CPU
      (whose fused SDPA has none) or eager attention store the probabilities: softmax output, mask and dropped
      copy, 3 a s (1 a s without dropout, eager).
    """
    compute, residual, mask = activation_bytes(model, training)
    h, q, kv, inter = model.hidden, model.query_hidden, model.kv_hidden, model.intermediate
    norms = 2 * residual * h * (2 if model.rms_norm else 1)
    if autocast_copies(model, training):
        norm_outputs = compute * h * ((3 if model.separate_qkv else 1) + (2 if model.gated_mlp else 1))
    else:
        norm_outputs = 2 * compute * h
    attention = compute * (2 * q + 2 * kv)
    mlp = compute * (4 if model.gated_mlp else 2) * inter
    dropout = 2 * mask * h if model.hidden_dropout else 0
    stores_probabilities = model.eager_attention or (model.attention_dropout and training.device == "cpu")
    if stores_probabilities:
        attention += compute * model.heads * training.sequence_length * (3 if model.attention_dropout else 1)
    return norms + norm_outputs + attention + mlp + dropout


def head_bytes(model: ModelShape, training: Training) -> int:
    """The output layer's activations. fused: the final norm, the gradient of the predicting rows (r h each), the
    float32 head-weight gradient built in the forward (vocab x h), and one chunk's float32 logits (whose storage
    becomes their gradient; under autocast also its 16-bit copy). logits and rows: the final norm, the logits (c),
    their float32 copy and log-softmax (4 + 4) on the head's rows, and with "logits" the model's full logits (c) at
    every position while the rows are picked."""
    compute, residual, _ = activation_bytes(model, training)
    tokens = training.batch_size * training.sequence_length
    h, vocab, head = model.hidden, model.vocab, model.head
    final_norm = tokens * residual * h * (2 if model.rms_norm else 1)
    if head.kind == "fused":
        chunk = min(head.chunk_tokens, tokens)
        return final_norm + tokens * residual * h + 4 * vocab * h + chunk * vocab * (4 if compute == 4 else 6)
    rows = math.ceil(tokens * head.rows_per_token)
    full = tokens * vocab * compute if head.kind == "logits" else 0
    return final_norm + rows * vocab * (compute + 8) + full


def blocks_held(layers: int, checkpoint_every: int | None) -> tuple[int, int]:
    """(checkpointed blocks, the most blocks' saved tensors held at once) with every `checkpoint_every`-th block
    checkpointed (None: none), as models/checkpointing.py picks them (the 1st, the (k+1)-th, ...). The backward
    starts holding every block that is not checkpointed; a checkpointed block's are held again while it is
    recomputed, beside those of the blocks below it that are not checkpointed. The block being differentiated
    adds its working set on top (activations())."""
    if checkpoint_every is None:
        return 0, layers
    checkpointed = len(range(0, layers, checkpoint_every))
    highest = (checkpointed - 1) * checkpoint_every
    kept_below_highest = highest - (checkpointed - 1)
    return checkpointed, max(layers - checkpointed, kept_below_highest + 1)


def activations(model: ModelShape, training: Training) -> int:
    """Blocks (a checkpointed block keeps its input; one that is not, its saved tensors; see blocks_held), one
    block's backward working set (the gradients of its saved tensors, about as large as they are: measured with
    bench/memory_plan.py), the embedding's dropout mask, the head, and autocast's cached 16-bit weights."""
    tokens = training.batch_size * training.sequence_length
    _, residual, mask = activation_bytes(model, training)
    per_layer = layer_activation_bytes(model, training)
    checkpointed, held = blocks_held(model.layers,
                                     training.checkpoint_every if training.gradient_checkpointing else None)
    blocks = tokens * (checkpointed * residual * model.hidden + (held + 1) * per_layer)
    embedding_dropout = tokens * mask * model.hidden if model.hidden_dropout else 0
    weight_copies = 2 * model.numel if autocast_copies(model, training) else 0
    return int(blocks) + embedding_dropout + head_bytes(model, training) + weight_copies


# --------------------------------------------------------------------------------------------- the whole plan
def zero3_partition(shapes, world_size: int, persistence_threshold: int) -> int:
    """Elements a process holds under ZeRO-3: ceil(numel / world) of each parameter, whole below the threshold."""
    return sum(numel(s) if numel(s) < persistence_threshold else math.ceil(numel(s) / world_size) for s in shapes)


def fsdp2_shard_shapes(shapes, world_size: int) -> list[tuple]:
    """FSDP2 shards dim 0, padded to a multiple of the world size: every process holds ceil(dim 0 / world) rows."""
    return [((math.ceil(s[0] / world_size),) + tuple(s[1:])) if s else () for s in shapes]


def zero12_partition(total: int, world_size: int) -> int:
    """ZeRO-1/2's flat partition: the group padded to a multiple of 2 x world (its alignment), divided."""
    return math.ceil(total / (2 * world_size)) * 2


def plan_memory(model: ModelShape, training: Training) -> MemoryPlan:
    weight, world, trainable = model.weight_bytes, training.world_size, model.trainable_numel
    compute = activation_bytes(model, training)[0]
    state = OPTIMIZER_STATE[training.optim]
    acts = activations(model, training)
    if training.backend in ("single", "ddp"):
        gradients = trainable * weight
        return MemoryPlan(model, training, parameters=model.numel * weight, master_weights=0, gradients=gradients,
                          optimizer_state=state(model.trainable_shapes, weight), activations=acts, working_set=0,
                          buckets=gradients if training.backend == "ddp" and world > 1 else 0)
    if training.backend == "fsdp2":
        shards = fsdp2_shard_shapes(model.trainable_shapes, world)
        shard = sum(numel(s) for s in shards) + math.ceil(model.frozen_numel / world)
        # Root unit (what is outside the blocks) unsharded from the forward to the backward, and two blocks.
        root = model.numel - model.layers * model.layer_numel
        unsharded = (root + 2 * model.layer_numel) * compute
        return MemoryPlan(model, training, parameters=shard * weight, master_weights=0,
                          gradients=sum(numel(s) for s in shards) * weight, optimizer_state=state(shards, weight),
                          activations=acts, working_set=unsharded + 2 * model.layer_numel * compute)
    return deepspeed_plan(model, training, acts)


def deepspeed_plan(model: ModelShape, training: Training, acts: int) -> MemoryPlan:
    world, stage = training.world_size, training.zero_stage
    module_bytes = 2 if training.mixed_precision != "no" else model.weight_bytes
    trainable = model.trainable_numel
    bucket = min(training.reduce_bucket, trainable) * module_bytes
    if stage == 3:
        partition = zero3_partition(model.trainable_shapes, world, training.persistence_threshold)
        parameters = (partition + math.ceil(model.frozen_numel / world)) * module_bytes
        gathered = (model.layer_numel + model.largest_other_numel) * module_bytes
        gradients = partition * 4 + bucket
    else:
        partition = zero12_partition(trainable, world) if stage else trainable
        parameters = model.numel * module_bytes
        gathered = 0
        whole = trainable * module_bytes if stage <= 1 else 0
        gradients = whole + partition * 4 + (bucket if stage == 2 else 0)
    master = partition * 4
    optimizer = OPTIMIZER_STATE[training.optim]([(partition,)], 4)
    host = 0
    if training.offload_optimizer:
        host += master + optimizer + partition * 4
        gradients -= partition * 4
        master = optimizer = 0
    if training.offload_parameters and stage == 3:
        host += parameters
        parameters = 0
    return MemoryPlan(model, training, parameters=parameters, master_weights=master, gradients=gradients,
                      optimizer_state=optimizer, activations=acts, working_set=gathered, host=host)


# ----------------------------------------------------------------------------------------------- the fit check
@dataclass(frozen=True)
class Change:
    """A change of the command line (or launcher) and the training it gives."""

    flags: str
    training: Training


def candidate_changes(training: Training) -> list[Change]:
    """The changes that lower the memory per process, cheapest in speed first: checkpointing, ZeRO-2, ZeRO-3,
    FSDP2 (these two need several processes), offload, then a smaller batch with more accumulation (same global
    batch)."""
    changes = []
    if not training.gradient_checkpointing or training.checkpoint_every > 1:
        flag = "--gradient_checkpointing_every 1" if training.gradient_checkpointing else "--gradient_checkpointing"
        changes.append(Change(flag, replace(training, gradient_checkpointing=True, checkpoint_every=1)))
    sharded = training.backend == "fsdp2" or (training.backend == "zero" and training.zero_stage == 3)
    if training.world_size > 1 and not sharded:
        deepspeed = replace(training, backend="zero", offload_optimizer=False, offload_parameters=False)
        if training.backend != "zero" or training.zero_stage < 2:
            changes.append(Change("--deepspeed ds_configs/zero2.json", replace(deepspeed, zero_stage=2)))
        changes.append(Change("--deepspeed ds_configs/zero3.json", replace(deepspeed, zero_stage=3)))
        changes.append(Change("FSDP2 (accelerate launch --config_file launch/accelerate/fsdp2.yaml)",
                              replace(training, backend="fsdp2")))
    if not (training.offload_optimizer and training.offload_parameters):
        changes.append(Change("--deepspeed ds_configs/zero3_offload.json",
                              replace(training, backend="zero", zero_stage=3, offload_optimizer=True,
                                      offload_parameters=True)))
    batch = training.batch_size // 2
    while batch >= 1:
        accumulation = training.accumulation * training.batch_size // batch
        if batch * accumulation == training.batch_size * training.accumulation:
            changes.append(Change(f"--per_device_train_batch_size {batch} --gradient_accumulation_steps "
                                  f"{accumulation}", replace(training, batch_size=batch, accumulation=accumulation)))
        batch //= 2
    return changes


def fitting_changes(plan: MemoryPlan, capacity: int) -> Optional[list[tuple[str, int]]]:
    """None when `plan` fits `capacity` bytes; else each single change whose recomputed plan fits, with its peak
    (of the DeepSpeed configs the cheapest, of the batch sizes the largest that fits), or, when none alone does,
    the first combination that fits, taking the changes one by one in `candidate_changes`' order (a later
    --deepspeed config or batch size replaces an earlier one); [] when nothing does."""
    if plan.peak <= capacity:
        return None
    fits = []
    for change in candidate_changes(plan.training):
        peak = plan_memory(plan.model, change.training).peak
        repeated = any(flag.split()[0] == change.flags.split()[0] for flag, _ in fits)
        if peak <= capacity and not repeated:
            fits.append((change.flags, peak))
    if fits:
        return fits
    combined, flags = plan.training, {}
    for change in candidate_changes(plan.training):
        combined = merge(combined, change.training, plan.training)
        flags[change.flags.split()[0]] = change.flags  # one --deepspeed config, one batch size
        peak = plan_memory(plan.model, combined).peak
        if peak <= capacity:
            return [(" ".join(flags.values()), peak)]
    return []


def merge(current: Training, changed: Training, original: Training) -> Training:
    """`current` with the fields in which `changed` differs from `original`."""
    updates = {name: getattr(changed, name) for name in Training.__dataclass_fields__
               if getattr(changed, name) != getattr(original, name)}
    return replace(current, **updates)


def fit_error(plan: MemoryPlan, capacity: int, fits: list[tuple[str, int]]) -> str:
    """The one-line refusal of a plan that does not fit."""
    need = f"the memory plan needs {gib(plan.peak)} per process ({plan.parts_text()})"
    have = f"the GPU has {gib(capacity)} free"
    escape = "--skip_memory_check if the estimate is wrong"
    if not fits:
        return (f"{need} and {have}, and no change of ZeRO stage, offload, checkpointing or batch size fits it; use "
                f"more processes or a larger GPU, or pass {escape}")
    options = "; ".join(f"{flags} ({gib(peak)})" for flags, peak in fits)
    return f"{need} and {have}; any of these fits: {options}; or pass {escape}"


# ------------------------------------------------------------------------------------ from the model and the job
@dataclass(frozen=True)
class PlannedModel:
    """What a job tells the plan (its `JobSpec.planned_model`): the model it would build, on the meta device, the
    sequence length it would train on, and its head."""

    hf_model: object
    sequence_length: int
    head: Head


def first_setting(config, names, default=None):
    return next((getattr(config, name) for name in names if getattr(config, name, None) is not None), default)


def model_shape(planned: PlannedModel, attn_implementation: Optional[str] = None) -> ModelShape:
    """The sizes the plan needs, read from a (meta-device) model: parameters from the model itself, widths from its
    config, the kind of norm, MLP and projections from its first repeated block (models/blocks.py)."""
    from trainer.models.blocks import repeated_blocks

    model, config = planned.hf_model, planned.hf_model.config
    parameters = list(model.parameters())
    blocks = repeated_blocks(model)
    block = blocks[0] if blocks is not None else None
    in_blocks = {id(p) for p in blocks.parameters()} if blocks is not None else set()
    names = {name.rsplit(".", 1)[-1] for name, _ in block.named_modules()} if block is not None else set()
    hidden = config.hidden_size
    heads = config.num_attention_heads
    kv_heads = first_setting(config, ["num_key_value_heads"], heads)
    head_dim = first_setting(config, ["head_dim"], hidden // heads)
    return ModelShape(
        trainable_shapes=tuple(tuple(p.shape) for p in parameters if p.requires_grad),
        frozen_numel=sum(p.numel() for p in parameters if not p.requires_grad),
        weight_bytes=parameters[0].element_size(),
        layers=len(blocks) if blocks is not None else 0,
        layer_numel=sum(p.numel() for p in block.parameters()) if block is not None else 0,
        largest_other_numel=max((p.numel() for p in parameters if id(p) not in in_blocks), default=0),
        hidden=hidden, heads=heads, query_hidden=heads * head_dim, kv_hidden=kv_heads * head_dim,
        intermediate=first_setting(config, ["intermediate_size", "n_inner"], 4 * hidden),
        vocab=config.vocab_size,
        gated_mlp=any("gate" in name for name in names),
        rms_norm=block is not None and any("RMSNorm" in type(m).__name__ for m in block.modules()),
        separate_qkv=bool(names & {"q_proj", "query", "q_lin", "q"}),
        attention_dropout=first_setting(config, ["attn_pdrop", "attention_dropout",
                                                 "attention_probs_dropout_prob"], 0.0) > 0,
        hidden_dropout=first_setting(config, ["resid_pdrop", "hidden_dropout_prob", "hidden_dropout"], 0.0) > 0,
        eager_attention=attn_implementation == "eager",
        head=planned.head,
    )


def deepspeed_settings(deepspeed_config: Optional[dict], hidden: int) -> dict:
    """The Training fields a (resolved) DeepSpeed config sets; buffer sizes left "auto" follow the width as
    distributed.deepspeed_config.fill_hidden_size_values fills them."""
    if deepspeed_config is None:
        return {}
    from trainer.distributed.deepspeed_config import HIDDEN_SIZE_KEYS

    zero = deepspeed_config.get("zero_optimization", {})

    def size(key: str, default: int) -> int:
        value = zero.get(key, default)
        return int(HIDDEN_SIZE_KEYS[key](hidden) if value == "auto" else value)

    def offloaded(section: str) -> bool:
        return (zero.get(section) or {}).get("device", "none") != "none"

    return {"zero_stage": zero.get("stage", 0),
            "offload_optimizer": offloaded("offload_optimizer"), "offload_parameters": offloaded("offload_param"),
            "reduce_bucket": size("reduce_bucket_size", DEEPSPEED_DEFAULT_BUCKET),
            "persistence_threshold": size("stage3_param_persistence_threshold", DEEPSPEED_DEFAULT_PERSISTENCE)}


def training_setup(config, planned: PlannedModel, backend: str, world_size: int, deepspeed_config: Optional[dict],
                   device: str) -> Training:
    """The Training of a job's configuration, for `backend` ("single", "ddp", "fsdp2"; DeepSpeed: its config)."""
    optimization = config.optimization
    return Training(backend=backend, world_size=world_size, optim=optimization.optim,
                    mixed_precision=config.parallelism.mixed_precision,
                    gradient_checkpointing=config.model.gradient_checkpointing,
                    checkpoint_every=config.model.gradient_checkpointing_every,
                    batch_size=optimization.per_device_train_batch_size, sequence_length=planned.sequence_length,
                    accumulation=optimization.gradient_accumulation_steps, device=device,
                    **deepspeed_settings(deepspeed_config, planned.hf_model.config.hidden_size))


def plan_table(plan: MemoryPlan) -> list[str]:
    """--estimate_memory's output: a heading line, then one line per part and the peak."""
    rows = [*plan.parts().items(), *([("host (offloaded)", plan.host)] if plan.host else []), ("peak", plan.peak)]
    return [f"memory plan per process: {plan.model.numel:,} parameters, {plan.training.describe()}",
            *(f"  {name:<18}{gib(size):>12}" for name, size in rows)]


def launch_backend(parallelism, optimization, world_size: int) -> tuple[str, Optional[dict]]:
    """The backend the launch asks for, read as make_accelerator reads it (flags and the launcher's environment),
    without starting anything: (kind, the resolved DeepSpeed config or None)."""
    from trainer.distributed.launch import deepspeed_requested, fsdp_requested, requested_deepspeed_config

    if deepspeed_requested(parallelism):
        return "zero", requested_deepspeed_config(parallelism, optimization, world_size)
    if fsdp_requested():
        return "fsdp2", None
    return ("ddp" if world_size > 1 else "single"), None


def accelerator_backend(accelerator) -> tuple[str, Optional[dict]]:
    """The backend of started processes: (kind, the DeepSpeed config or None)."""
    from trainer.distributed.launch import uses_deepspeed, uses_fsdp

    if uses_deepspeed(accelerator):
        return "zero", accelerator.deepspeed_plugin.deepspeed_config
    if uses_fsdp(accelerator):
        return "fsdp2", None
    return ("ddp" if accelerator.num_processes > 1 else "single"), None


def check_fits(plan: MemoryPlan, capacity: int) -> None:
    """A UsageError naming the flags that would make `plan` fit, when it does not fit `capacity` bytes."""
    from trainer.errors import UsageError

    fits = fitting_changes(plan, capacity)
    if fits is not None:
        raise UsageError(fit_error(plan, capacity, fits))


def free_device_memory(device) -> Optional[int]:
    """Free bytes of a CUDA device (what this process can still allocate); None elsewhere."""
    import torch

    if getattr(device, "type", device) != "cuda":
        return None
    return torch.cuda.mem_get_info(device)[0]
