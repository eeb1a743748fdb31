"""DeepSpeed ZeRO under the shared engine: same mathematics as DDP, exportable, checkpointable; bad configs refused.

Real DeepSpeed on the CPU (its CPU accelerator, gloo), 2 processes. The runs are the resume tests' job
(resume_helpers: 12 steps, accumulation 2, dropout on, weight decay, warmup), so the DDP side is the session's
two-process run of it (conftest.two_process_resume_run) and the ZeRO-3 run is also the reference of the ZeRO-3
resume test. Tolerance for ZeRO vs DDP parameters: global relative difference (norm of the difference over the norm
of the parameters) <= 1e-5 in fp32 — the runs differ only in the order of floating-point reductions (observed ~2e-7).
"""
import copy
import json
import os

import pytest

from conftest import (REPO_ROOT, assert_export_reproduces_eval_perplexity, deepspeed_launch, fails_cleanly,
                      load_parameters, mlm_args, read_history, relative_difference, run_job)
from resume_helpers import assert_sharded_stop_and_resume_is_exact, resume_args, run_two_process_resume_job

TOLERANCE = 1e-5


def ds_config(name: str) -> str:
    return os.path.join(REPO_ROOT, "ds_configs", f"{name}.json")


@pytest.fixture(scope="module")
def runs(corpus, tokenizer_dir, job_env, tmp_path_factory, two_process_resume_run):
    """The 2-process DDP reference and ZeRO-2/3 runs of the same job. ZeRO-2 is started by DeepSpeed's own launcher
    (`deepspeed --num_gpus 2 --module ...`, which works on the CPU too) and round-trips its sharded checkpoint after
    training (tests/deepspeed_roundtrip.py); ZeRO-3 with optimizer and parameters offloaded to the CPU steps with
    DeepSpeedCPUAdam (accelerate swaps it in). ZeRO-1 is ZeRO-2's optimizer without gradient partitioning: only
    its config is checked here. ZeRO-2 and offloaded ZeRO-3 also run with --gradient_checkpointing, which changes
    no parameter (dropout draws the same masks when a block is recomputed): they still match DDP without it."""
    root = tmp_path_factory.mktemp("zero")
    outputs = {"ddp": two_process_resume_run[0], "zero2": root / "zero2"}
    checkpointed = ["--gradient_checkpointing"]
    run_job("tests.deepspeed_roundtrip", resume_args(corpus, tokenizer_dir, outputs["zero2"], 2, "--deepspeed",
                                                     ds_config("zero2"), *checkpointed), job_env,
            launcher=deepspeed_launch())
    for name, extra in (("zero3", []), ("zero3_offload", checkpointed)):
        outputs[name] = root / name
        result = run_two_process_resume_job(corpus, tokenizer_dir, job_env, outputs[name],
                                            ["--deepspeed", ds_config(name), *extra])
        assert ("gradient checkpointing" in result.stdout + result.stderr) == bool(extra)
    return outputs


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["zero2", "zero3", "zero3_offload"])
def test_zero_parameters_and_losses_match_ddp(runs, stage):
    reference = load_parameters(runs["ddp"])
    difference = relative_difference(reference, load_parameters(runs[stage]))
    assert difference <= TOLERANCE, f"{stage} differs from DDP by {difference:.2e}"
    losses = {name: [r["train_loss"] for r in read_history(runs[name]) if "train_loss" in r] for name in ("ddp", stage)}
    assert losses[stage] == pytest.approx(losses["ddp"], rel=1e-5)
    assert losses["ddp"][-1] < losses["ddp"][0]  # training moved: the comparison is not vacuous


@pytest.mark.slow
def test_zero3_export_reloads_and_reproduces_eval_perplexity(runs, corpus, tokenizer_dir, job_env, tmp_path):
    assert_export_reproduces_eval_perplexity(runs["zero3"], corpus, tokenizer_dir, job_env, tmp_path,
                                             "--max_eval_samples", "16")


@pytest.mark.slow
def test_zero3_run_stopped_and_resumed_ends_where_an_uninterrupted_one_does(runs, corpus, tokenizer_dir, job_env,
                                                                             tmp_path):
    """Every rank writes its shard of model and optimizer state into the checkpoint and reads it back."""
    assert_sharded_stop_and_resume_is_exact(corpus, tokenizer_dir, job_env, tmp_path, "deepspeed",
                                            extra=["--deepspeed", ds_config("zero3")], uninterrupted=runs["zero3"])


@pytest.mark.slow
def test_zero2_sharded_checkpoint_round_trips(runs):
    """Saved after training, weights perturbed, loaded back: the same weights; every rank wrote its optimizer shard."""
    with open(runs["zero2"] / "roundtrip.json") as handle:
        report = json.load(handle)
    assert report["perturbed"] and report["restored"]
    assert sum("optim_states" in name for name in report["rank_files"]) == 2


# ------------------------------------------------------------------------------------------------- bad input
def check(config: dict, tmp_path, world_size: int = 2, **arguments):
    """resolve_deepspeed_config on `config` written to a file, with the optimization and parallelism sections
    built from `arguments`."""
    from trainer.distributed.arguments import ParallelismArguments
    from trainer.distributed.deepspeed_config import load_deepspeed_config, resolve_deepspeed_config
    from trainer.engine.optim import OptimizationArguments

    path = tmp_path / "ds.json"
    path.write_text(json.dumps(config))
    optimization = {k: v for k, v in arguments.items() if k in OptimizationArguments.__dataclass_fields__}
    parallelism = {k: v for k, v in arguments.items() if k not in optimization}
    return resolve_deepspeed_config(load_deepspeed_config(str(path)), OptimizationArguments(**optimization),
                                    ParallelismArguments(**parallelism), world_size=world_size, source=str(path))


def shipped(name: str) -> dict:
    with open(ds_config(name)) as handle:
        return json.load(handle)


def test_auto_values_are_filled_from_the_command_line(tmp_path):
    config = check(shipped("zero3"), tmp_path, per_device_train_batch_size=4, gradient_accumulation_steps=3,
                   max_grad_norm=0.5, bf16=True, learning_rate=1e-3, max_steps=100, warmup_ratio=0.1)
    assert (config["train_micro_batch_size_per_gpu"], config["gradient_accumulation_steps"],
            config["train_batch_size"]) == (4, 3, 2 * 4 * 3)
    assert config["gradient_clipping"] == 0.5
    assert config["bf16"]["enabled"] is True and config["fp16"]["enabled"] is False
    assert config["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True
    # The optimizer and schedule are checked, then left to the engine (the same AdamW and schedule as DDP).
    assert "optimizer" not in config and "scheduler" not in config
    for name in ("zero1", "zero2", "zero3", "zero3_offload"):
        assert "auto" not in json.dumps(check(shipped(name), tmp_path, max_steps=10)).replace(
            '"reduce_bucket_size": "auto"', "").replace('"stage3_prefetch_bucket_size": "auto"', "").replace(
            '"stage3_param_persistence_threshold": "auto"', "")  # these follow the model width at prepare()


def test_zero1_and_zero2_overlap_communication_only_with_several_processes_and_use_large_buckets(tmp_path):
    for name in ("zero1", "zero2"):
        assert check(shipped(name), tmp_path, world_size=1)["zero_optimization"]["overlap_comm"] is False
        zero = check(shipped(name), tmp_path, world_size=8)["zero_optimization"]
        assert zero["overlap_comm"] is True
        # Not the h * h "auto" (590k elements for BERT-base: ~190 reductions per step)
        assert zero["reduce_bucket_size"] == zero["allgather_bucket_size"] == 200_000_000
    explicit = check(shipped("zero3"), tmp_path, world_size=1)["zero_optimization"]
    assert explicit["overlap_comm"] is True  # an explicit value is the user's


@pytest.mark.parametrize("change, arguments, message", [
    (lambda c: c["zero_optimization"].update(stage=4), {}, "unknown ZeRO stage 4"),
    (lambda c: c.update(gradient_accumulation_steps=4), {"gradient_accumulation_steps": 2},
     "gradient_accumulation_steps=4 but --gradient_accumulation_steps gives 2"),
    (lambda c: c["optimizer"]["params"].update(lr=0.1), {"learning_rate": 1e-3},
     "optimizer.params.lr=0.1 but --learning_rate gives 0.001"),
    (lambda c: c.update(train_batch_size=64), {"per_device_train_batch_size": 8},
     "train_batch_size=64 but processes x --per_device_train_batch_size x --gradient_accumulation_steps gives 16"),
    (lambda c: c["bf16"].update(enabled=True), {}, "bf16.enabled=true but --bf16 gives false"),
    (lambda c: c["scheduler"].update(type="WarmupLR"), {"lr_scheduler_type": "linear"},
     'scheduler.type="WarmupLR" but --lr_scheduler_type linear gives "WarmupDecayLR"'),
    (lambda c: c["zero_optimization"]["offload_optimizer"].update(device="nvme", nvme_path="/no/such/dir"), {},
     'nvme_path "/no/such/dir" is not an existing directory'),
])
def test_bad_configs_name_the_problem(tmp_path, change, arguments, message):
    from trainer.errors import UsageError

    config = copy.deepcopy(shipped("zero3_offload"))
    change(config)
    with pytest.raises(UsageError) as error:
        check(config, tmp_path, **arguments)
    assert message in str(error.value)


@pytest.mark.parametrize("content, message", [
    ('{"zero_optimization": {"stage": 2}', "is not valid JSON"),
    ('{"zero_optimization": {"stage": "two"}}', 'unknown ZeRO stage "two"'),
    ('{"zero_optimization": {"stage": 3, "offload_param": {"device": "nvme", "nvme_path": "/no/such"}}}',
     "offloads to nvme"),
    ('{"train_micro_batch_size_per_gpu": 2, "zero_optimization": {"stage": 2}}', "--per_device_train_batch_size"),
])
def test_bad_config_exits_2_with_one_line_and_writes_nothing(corpus, tokenizer_dir, in_process_job, capsys, tmp_path,
                                                            content, message):
    """In this process (`in_process_job`: the test caches; the exit code and the line are `main`'s, and
    test_fuzz_inputs.py shows them in real processes)."""
    from trainer.mlm import main

    config = tmp_path / "ds.json"
    config.write_text(content)
    out = tmp_path / "out"
    assert message in fails_cleanly(main, mlm_args(corpus, tokenizer_dir, out, "--deepspeed", str(config)), capsys)
    assert not out.exists()

