"""On a GPU: a steady-state training step never waits for the device (run by bench/gpu_check.sh on a GPU machine).

Skipped without CUDA. `torch.cuda.set_sync_debug_mode("error")` raises on any synchronising CUDA call (a pageable
copy, .item(), a stream or device synchronize), so steps 4-8 here prove the loop lets the host run ahead.
"""
import pytest
import torch

from conftest import mlm_args

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def engine_for(argv):
    from trainer.engine.assembly import assemble
    from trainer.engine.jobs import job_config, start_job
    from trainer.mlm import MLM_JOB

    config, files, accelerator = start_job(MLM_JOB, job_config(MLM_JOB, argv))
    return assemble(config, MLM_JOB.build_task(config, files, accelerator), accelerator)


@pytest.mark.parametrize("extra", [["--bf16"], [], ["--bf16", "--gradient_accumulation_steps", "2"],
                                   ["--bf16", "--torch_compile"]], ids=["bf16", "tf32", "accumulation", "compiled"])
def test_steady_state_steps_do_not_synchronise(corpus, tokenizer_dir, job_env, tmp_path, monkeypatch, extra):
    from trainer.engine.loop import Window

    for key in ("TRAINER_CACHE", "HF_DATASETS_CACHE", "HF_HOME", "HF_HUB_OFFLINE"):
        monkeypatch.setenv(key, job_env[key])
    engine = engine_for(mlm_args(corpus, tokenizer_dir, tmp_path / "run", "--max_steps", "8",
                                 "--per_device_train_batch_size", "16", *extra))
    assert engine.accelerator.device.type == "cuda" and engine.settings.loader_workers > 0
    batches, window = engine.data.micro_batches(), Window(engine.accelerator.device)

    def step():
        engine.optimizer_step([next(batches) for _ in range(engine.settings.accumulation_steps)], window)

    for _ in range(3):  # warm-up: allocator, cuBLAS handles, compilation
        step()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(5):
            step()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert engine.state.step == 8
    assert torch.isfinite(window.loss_sum).item()
