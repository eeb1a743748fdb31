"""Run by test_deepspeed.py under torchrun: train a job under DeepSpeed, then round-trip DeepSpeed's sharded
checkpoint. Writes roundtrip.json (rank 0) with what it found; the test asserts on it."""
import json
import os
import sys

import torch
from accelerate.utils import set_seed

from trainer.config.job_config import parse_job_config
from trainer.data.arguments import DataFiles
from trainer.distributed.launch import make_accelerator
from trainer.distributed.parameters import full_state_dict
from trainer.engine.assembly import assemble
from trainer.mlm import MLM_JOB, build_task


def main(argv):
    config = parse_job_config(MLM_JOB.all_sections, argv)
    accelerator = make_accelerator(config.parallelism, config.optimization)
    set_seed(config.optimization.seed)  # as trainer.mlm.main: the same initial model as the DDP reference
    task = build_task(config, DataFiles(config.data.train_file, config.data.validation_file), accelerator)
    engine = assemble(config, task, accelerator)
    engine.train()
    output_dir = config.checkpointing.output_dir

    def weights():
        return full_state_dict(accelerator, engine.model, task.hf_model)

    saved = weights()
    checkpoint = os.path.join(output_dir, "sharded")
    engine.checkpointer.save_sharded_state(checkpoint)
    with torch.no_grad():
        for parameter in engine.model.parameters():
            parameter.add_(1.0)
    perturbed = weights()
    engine.checkpointer.load_sharded_state(checkpoint)
    restored = weights()
    if accelerator.is_main_process:
        report = {"perturbed": any(not torch.equal(saved[k], perturbed[k]) for k in saved),
                  "restored": all(torch.equal(saved[k], restored[k]) for k in saved),
                  "rank_files": sorted(os.listdir(os.path.join(checkpoint, "deepspeed")))}
        with open(os.path.join(output_dir, "roundtrip.json"), "w") as handle:
            json.dump(report, handle)


if __name__ == "__main__":
    main(sys.argv[1:])
