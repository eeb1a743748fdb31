"""Shared by test_ewc.py and test_clm_launch.py: engines built in this process, and made-up EWC files.

A made-up file (a random positive Fisher, an anchor away from the initial weights) makes the penalty's gradient
as large as the data's, so that a penalty applied wrongly (on the wrong shard, per micro-batch, not at all)
cannot hide in a tolerance. Real Fisher files come from --save_fisher runs."""
from __future__ import annotations

import os

import torch
from safetensors.torch import save_file

from trainer.continual.ewc import ANCHOR, FISHER
from trainer.layout import FISHER_FILE

STRENGTH = 0.25  # --ewc_lambda: the penalty's gradient then about as large as the data's


def ewc_flags(fisher_dir: str) -> list[str]:
    return ["--ewc_from", fisher_dir, "--ewc_lambda", str(STRENGTH)]


def job_environment(patch, job_env: dict) -> None:
    """What conftest.job_env gives job subprocesses, for a job built in this process (`patch`: a MonkeyPatch)."""
    for key in ("TRAINER_CACHE", "HF_DATASETS_CACHE", "HF_HOME", "HF_HUB_OFFLINE"):
        patch.setenv(key, job_env[key])


def clm_engine(argv: list[str]):
    """trainer.clm's engine for `argv`, built as its `main` builds it, without training."""
    from trainer.clm import CLM_JOB
    from trainer.engine.assembly import assemble
    from trainer.engine.jobs import job_config, start_job

    config, files, accelerator = start_job(CLM_JOB, job_config(CLM_JOB, argv))
    return assemble(config, CLM_JOB.build_task(config, files, accelerator), accelerator)


def write_made_up_fisher(engine, directory) -> str:
    """FISHER_FILE in `directory` for `engine`'s model: F ~ U(0, 1), theta* = theta_0 + 0.05 N(0, 1)."""
    generator = torch.Generator().manual_seed(0)
    tensors = {}
    for name, parameter in engine.accelerator.unwrap_model(engine.model).named_parameters():
        tensors[FISHER + name] = torch.rand(parameter.shape, generator=generator)
        tensors[ANCHOR + name] = parameter.detach() + 0.05 * torch.randn(parameter.shape, generator=generator)
    os.makedirs(directory, exist_ok=True)
    save_file(tensors, os.path.join(directory, FISHER_FILE))
    return str(directory)
