"""Run by test_deepspeed.py under torchrun: train a job under DeepSpeed, then round-trip DeepSpeed's sharded
checkpoint. Writes roundtrip.json (rank 0) with what it found; the test asserts on it."""
import json
import os
import sys

import torch
from accelerate.utils import set_seed

from trainer.config.arguments import DataArguments, ModelArguments, TrainingArguments
from trainer.config.parsing import parse_arguments
from trainer.distributed.launch import make_accelerator
from trainer.distributed.parameters import full_state_dict
from trainer.engine.loop import Engine
from trainer.mlm import MLMArguments, build_task


def main(argv):
    model_args, data_args, training_args, mlm_args = parse_arguments(
        (ModelArguments, DataArguments, TrainingArguments, MLMArguments), argv)
    accelerator = make_accelerator(training_args)
    set_seed(training_args.seed)  # as trainer.mlm.main: the same initial model as the DDP reference
    task = build_task(model_args, data_args, training_args, mlm_args, accelerator)
    engine = Engine(training_args, task, accelerator)
    engine.train()

    def weights():
        return full_state_dict(accelerator, engine.model, task.hf_model)

    saved = weights()
    checkpoint = os.path.join(training_args.output_dir, "sharded")
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
        with open(os.path.join(training_args.output_dir, "roundtrip.json"), "w") as handle:
            json.dump(report, handle)


if __name__ == "__main__":
    main(sys.argv[1:])
