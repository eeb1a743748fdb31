"""The memory plan (trainer/engine/memory_plan.py): exact byte counts for a tiny model (parameters, their shards under
ZeRO-1/2/3 and FSDP2, optimizer state against the real optimizers' state), the activation formula against what
autograd really saves, checkpointing, the fit check with a fake capacity, and --estimate_memory end to end."""
import math
import os
import subprocess
import sys
import time
from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch

from trainer.engine.memory_plan import (Head, OPTIMIZER_STATE, PlannedModel, Training, activations, blocks_held,
                                        candidate_changes, check_fits, fit_error, fitting_changes,
                                        layer_activation_bytes, model_shape, plan_memory)
from trainer.engine.optim import OPTIMIZERS
from trainer.errors import UsageError

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BATCH, SEQUENCE = 4, 64


def gpt2(layers=2, dropout=0.0, dtype=torch.float32, device="meta"):
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=512, n_embd=64, n_layer=layers, n_head=4, n_positions=128, resid_pdrop=dropout,
                        embd_pdrop=dropout, attn_pdrop=dropout, bos_token_id=0, eos_token_id=0)
    with torch.device(device):
        return GPT2LMHeadModel(config).to(dtype)


def llama(layers=2, device="meta"):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=172, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    with torch.device(device):
        return LlamaForCausalLM(config)


def shape(model, head=Head("fused", chunk_tokens=64)):
    return model_shape(PlannedModel(model, SEQUENCE, head))


def training(**changes) -> Training:
    return replace(Training(batch_size=BATCH, sequence_length=SEQUENCE), **changes)


def shapes_of(model):
    return [tuple(p.shape) for p in model.parameters()]


def test_parameters_are_numel_times_the_dtype_size():
    model = gpt2()
    numel = sum(p.numel() for p in model.parameters())
    assert plan_memory(shape(model), training()).parameters == numel * 4
    assert plan_memory(shape(gpt2(dtype=torch.bfloat16)), training()).parameters == numel * 2
    single = plan_memory(shape(model), training())
    assert single.gradients == numel * 4 and single.buckets == 0
    ddp = plan_memory(shape(model), training(backend="ddp", world_size=2))  # the reducer's buckets: a second copy
    assert ddp.parameters == numel * 4 and ddp.gradients == numel * 4 and ddp.buckets == numel * 4


def test_zero3_and_fsdp2_divide_the_parameters_by_the_world_size():
    model = llama()
    for world in (1, 2, 3):
        zero3 = plan_memory(shape(model), training(backend="zero", zero_stage=3, world_size=world,
                                                   persistence_threshold=100))
        # ceil(numel / world) of each parameter; those below the persistence threshold whole on every process.
        partition = sum(n if n < 100 else math.ceil(n / world) for n in (p.numel() for p in model.parameters()))
        assert zero3.parameters == partition * 4 and zero3.master_weights == partition * 4
        assert zero3.optimizer_state == partition * 8  # AdamW's two fp32 states of the partition
        fsdp2 = plan_memory(shape(model), training(backend="fsdp2", world_size=world))
        rows = sum(math.ceil(s[0] / world) * math.prod(s[1:]) for s in shapes_of(model))  # dim 0 padded
        assert fsdp2.parameters == rows * 4 and fsdp2.gradients == rows * 4 and fsdp2.optimizer_state == rows * 8
    bf16 = plan_memory(shape(model), training(backend="zero", zero_stage=3, world_size=2, mixed_precision="bf16",
                                              persistence_threshold=1))
    halves = sum(math.ceil(p.numel() / 2) for p in model.parameters())
    assert bf16.parameters == halves * 2 and bf16.master_weights == halves * 4  # 16-bit module, fp32 master


def test_zero1_and_zero2_partition_the_optimizer_state_and_gradients():
    model = llama()
    numel = sum(p.numel() for p in model.parameters())
    for world in (2, 4):
        partition = math.ceil(numel / (2 * world)) * 2  # the flat group aligned to 2 x world elements
        stage1 = plan_memory(shape(model), training(backend="zero", zero_stage=1, world_size=world,
                                                    reduce_bucket=1000))
        stage2 = plan_memory(shape(model), training(backend="zero", zero_stage=2, world_size=world,
                                                    reduce_bucket=1000))
        for plan in (stage1, stage2):
            assert plan.parameters == numel * 4 and plan.master_weights == partition * 4
            assert plan.optimizer_state == partition * 8
        assert stage1.gradients == numel * 4 + partition * 4  # whole, plus the fp32 partition
        assert stage2.gradients == partition * 4 + 1000 * 4  # the partition and one reduce bucket
    offloaded = plan_memory(shape(model), training(backend="zero", zero_stage=2, world_size=2,
                                                   reduce_bucket=1000, offload_optimizer=True))
    partition = math.ceil(numel / 4) * 2
    assert offloaded.optimizer_state == offloaded.master_weights == 0 and offloaded.gradients == 1000 * 4
    assert offloaded.host == partition * (8 + 4 + 4)


def real_state_bytes(optim: str, model) -> int:
    """The bytes of the optimizer's tensor state after a real step (the scalar step counters left out)."""
    optimization = SimpleNamespace(learning_rate=1e-3, adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8)
    optimizer = OPTIMIZERS[optim]([{"params": list(model.parameters())}], optimization)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    optimizer.step()
    return sum(t.numel() * t.element_size() for state in optimizer.state.values() for t in state.values()
               if torch.is_tensor(t) and t.dim() > 0)


def test_low_bit_adamw_state_is_codes_scales_and_code_book_for_large_tensors_and_fp32_for_the_rest():
    # A real step of torchao's optimizers compiles one update per shape (minutes on 2 cores): the table is checked
    # against torchao's layout here, and bench/optimizer_state.py measures the real state (0.255x / 0.133x).
    shapes = [(64, 64), (10,)]
    assert OPTIMIZER_STATE["adamw_torch_8bit"](shapes, 4) == 2 * (4096 + 4 * 16 + 4 * 256) + 2 * 4 * 10
    assert OPTIMIZER_STATE["adamw_torch_4bit"](shapes, 4) == 2 * (2048 + 4 * 32 + 4 * 16) + 2 * 4 * 10


@pytest.mark.parametrize("optim", [name for name in OPTIMIZERS if not name.endswith("bit")])
def test_optimizer_state_is_what_the_optimizer_keeps(optim):
    model = gpt2(device="cpu")
    planned = plan_memory(shape(model), training(optim=optim)).optimizer_state
    assert planned == real_state_bytes(optim, model)
    numel = sum(p.numel() for p in model.parameters())
    expected = {"adamw_torch_fused": 8 * numel, "adamw_torch": 8 * numel, "sgd": 0}
    assert expected.get(optim, planned) == planned
    if optim == "adafactor":
        assert planned < numel  # factored: rows + columns of each matrix
    assert set(OPTIMIZER_STATE) >= set(OPTIMIZERS)  # every --optim has its line in the table


def saved_block_bytes(model, autocast: bool) -> int:
    """What autograd keeps for the backward of the model's body (parameters left out), counted by storage."""
    storages = {}
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in parameters:
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    ids = torch.randint(0, 512, (BATCH, SEQUENCE))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor), \
            torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        model.base_model(ids, use_cache=False)
    return sum(storages.values())


@pytest.mark.parametrize("family, dropout, autocast", [("gpt2", 0.0, False), ("gpt2", 0.1, False),
                                                       ("gpt2", 0.0, True), ("llama", 0.0, False),
                                                       ("llama", 0.0, True)])
def test_the_layer_formula_is_what_autograd_saves(family, dropout, autocast):
    from trainer.models.kernels import fuse_activations

    def build(layers):
        torch.manual_seed(0)
        model = gpt2(layers, dropout, device="cpu") if family == "gpt2" else llama(layers, device="cpu")
        fuse_activations(model)  # as the engine does
        return model.train()

    # One layer's saved bytes: two layers less one (embeddings and the final norm cancel out), weight casts aside.
    one, two = build(1), build(2)
    measured = saved_block_bytes(two, autocast) - saved_block_bytes(one, autocast)
    setup = training(mixed_precision="bf16" if autocast else "no")
    casts = 2 * (sum(p.numel() for p in two.parameters()) - sum(p.numel() for p in one.parameters())) if autocast else 0
    planned = layer_activation_bytes(shape(two), setup) * BATCH * SEQUENCE + casts
    assert planned == pytest.approx(measured, rel=0.03)


def test_checkpointing_keeps_the_block_inputs_and_one_block():
    model = shape(llama(layers=8))
    plain, checkpointed = training(), training(gradient_checkpointing=True)
    tokens, per_layer = BATCH * SEQUENCE, layer_activation_bytes(model, plain)
    difference = activations(model, plain) - activations(model, checkpointed)
    assert difference == int(tokens * 9 * per_layer) - int(tokens * (8 * 4 * model.hidden + 2 * per_layer))
    assert activations(model, checkpointed) < activations(model, plain) / 2


def test_checkpointing_every_kth_block_keeps_the_other_blocks_activations():
    """Blocks 0, 2, 4, 6 of 8 checkpointed: their inputs, and at most 4 blocks' saved tensors at once (the 4 that
    are not checkpointed, or 3 of them and block 6 recomputed), plus one block's working set."""
    model = shape(llama(layers=8))
    plain, every_block = training(), training(gradient_checkpointing=True)
    every_2nd = training(gradient_checkpointing=True, checkpoint_every=2)
    tokens, per_layer = BATCH * SEQUENCE, layer_activation_bytes(model, plain)
    difference = activations(model, plain) - activations(model, every_2nd)
    assert difference == int(tokens * 9 * per_layer) - int(tokens * (4 * 4 * model.hidden + 5 * per_layer))
    assert activations(model, every_block) < activations(model, every_2nd) < activations(model, plain)
    # 13 blocks, every 3rd: the last one (12) is checkpointed, and recomputing it adds its saved tensors to those of
    # the 8 kept below it.
    assert blocks_held(12, 3) == (4, 8) and blocks_held(13, 3) == (5, 9)
    assert blocks_held(8, 1) == (8, 1) and blocks_held(8, None) == (0, 8)
    assert "gradient checkpointing every 2 blocks" in every_2nd.describe()
    assert candidate_changes(every_2nd)[0].flags == "--gradient_checkpointing_every 1"


def test_a_plan_that_fits_is_accepted_and_one_that_does_not_names_the_flags_that_fit():
    model = shape(llama(layers=8), Head("logits"))
    plan = plan_memory(model, training(backend="ddp", world_size=4, batch_size=8))
    assert fitting_changes(plan, plan.peak) is None
    check_fits(plan, plan.peak)
    capacity = plan.peak - 1
    fits = fitting_changes(plan, capacity)
    flags = [flag for flag, _ in fits]
    # Each checked by recomputing the plan; the cheapest DeepSpeed config that fits, and one batch size, the
    # largest that fits, keeping the global batch.
    assert flags[:3] == ["--gradient_checkpointing", "--deepspeed ds_configs/zero2.json",
                         "FSDP2 (accelerate launch --config_file launch/accelerate/fsdp2.yaml)"]
    assert flags[-1] == "--per_device_train_batch_size 4 --gradient_accumulation_steps 2"
    assert all(peak <= capacity for _, peak in fits)
    with pytest.raises(UsageError) as refused:
        check_fits(plan, capacity)
    message = str(refused.value)
    assert "\n" not in message and "--gradient_checkpointing (" in message and "--skip_memory_check" in message
    # Nothing fits one byte: the message says so; a combination is offered when no single change is enough.
    assert fitting_changes(plan, 1) == [] and "no change of ZeRO stage" in fit_error(plan, 1, [])
    strongest = plan_memory(model, training(backend="ddp", world_size=4, batch_size=8, gradient_checkpointing=True))
    combined = fitting_changes(plan, strongest.peak - 1)
    assert combined and all(peak < strongest.peak for _, peak in combined)


def test_the_startup_check_refuses_a_plan_above_the_free_gpu_memory(monkeypatch, caplog):
    from trainer.clm import CLM_JOB
    from trainer.config.job_config import parse_job_config
    from trainer.engine import jobs, memory_plan

    config = parse_job_config(CLM_JOB.all_sections, ["--output_dir", "unused"], default_config=CLM_JOB.demo_config)
    accelerator = SimpleNamespace(num_processes=1, device=torch.device("cpu"), distributed_type="NO")
    monkeypatch.setattr(memory_plan, "accelerator_backend", lambda accelerator: ("single", None))
    monkeypatch.setattr(memory_plan, "free_device_memory", lambda device: 100 * 2 ** 20)  # a 100 MiB "GPU"
    with pytest.raises(UsageError, match="any of these fits: .*--per_device_train_batch_size 8 "
                                         "--gradient_accumulation_steps 2"):
        jobs.plan_before_start(CLM_JOB, config, accelerator)
    skipping = parse_job_config(CLM_JOB.all_sections, ["--output_dir", "unused", "--skip_memory_check"],
                                default_config=CLM_JOB.demo_config)
    with caplog.at_level("INFO", logger="trainer"):
        jobs.plan_before_start(CLM_JOB, skipping, accelerator)  # logged, not refused
    assert "memory plan per process: peak 126.8 MiB (parameters 5.5 MiB, gradients 5.5 MiB" in caplog.text


LLAMA_70B = ("hidden_size=8192,intermediate_size=28672,num_hidden_layers=80,num_attention_heads=64,"
             "num_key_value_heads=8,max_position_embeddings=8192")


def test_estimate_memory_plans_a_70b_llama_without_building_it(tmp_path, job_env):
    output_dir = tmp_path / "out"
    command = [sys.executable, "-m", "trainer.clm", "--estimate_memory", "--model_type", "llama",
               "--config_overrides", LLAMA_70B, "--tokenizer_vocab_size", "128256", "--block_size", "4096",
               "--per_device_train_batch_size", "1", "--bf16", "--gradient_checkpointing", "--lr_scheduler_type",
               "linear", "--deepspeed", os.path.join(REPO_ROOT, "ds_configs", "zero3.json"),
               "--output_dir", str(output_dir)]
    start = time.perf_counter()
    result = subprocess.run(command, env={**job_env, "WORLD_SIZE": "8"}, cwd=tmp_path, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    assert lines[0].startswith("memory plan per process: 70,553,706,496 parameters, DeepSpeed ZeRO-3 x 8 processes")
    parts = {line.split()[0]: line.split()[-2:] for line in lines[1:]}
    # 70.55e9 / 8 parameters per process in bf16: 16.43 GiB; fp32 master 32.86 GiB; AdamW 65.72 GiB.
    assert parts["parameters"] == ["16.43", "GiB"] and parts["optimizer"] == ["65.72", "GiB"]
    assert not output_dir.exists() and os.listdir(tmp_path) == []
    # 280 GB of fp32 weights never built: the run is imports and a meta-device model.
    assert time.perf_counter() - start < 120


def test_clm_plans_what_its_finetune_strategy_trains():
    from trainer.clm import CLM_JOB, planned_model
    from trainer.config.job_config import parse_job_config
    from trainer.finetune.strategies import apply_strategy

    flags = ["--model_type", "llama", "--config_overrides", "hidden_size=64,intermediate_size=172,num_hidden_layers=2,"
             "num_attention_heads=4,num_key_value_heads=2,head_dim=16,max_position_embeddings=128", "--finetune_strategy",
             "lora"]
    config = parse_job_config(CLM_JOB.all_sections, flags, default_config=CLM_JOB.demo_config)
    planned = model_shape(planned_model(config))
    real, _ = apply_strategy(llama(device="cpu"), config.finetune, task_type="CAUSAL_LM")
    # The same adapters on the same shapes (the demo's vocabulary aside, which LoRA leaves frozen).
    assert planned.trainable_numel == sum(p.numel() for p in real.parameters() if p.requires_grad) > 0
    assert plan_memory(planned, training()).optimizer_state == 8 * planned.trainable_numel
