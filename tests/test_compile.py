"""--torch_compile: the transformer blocks compile once, never recompile in training or evaluation, and train like
eager, with --gradient_checkpointing too. On the CPU the test uses the aot_eager backend (dynamo's graph capture and AOT autograd without inductor's
code generation, which takes minutes on 2 cores); bench/gpu_check.sh runs it with inductor on a GPU
(TRAINER_TEST_COMPILE_BACKEND=inductor)."""
import os

import pytest
import torch
from torch._dynamo.utils import counters

from conftest import load_parameters, mlm_args, read_history

THREE_LAYERS = ["--config_overrides", "hidden_size=32,num_hidden_layers=3,num_attention_heads=2,intermediate_size=64,"
                "hidden_dropout_prob=0,attention_probs_dropout_prob=0,max_position_embeddings=128"]


def run_in_process(corpus, tokenizer_dir, output_dir, *extra):
    from trainer.mlm import main

    args = mlm_args(corpus, tokenizer_dir, output_dir, "--max_steps", "3", "--per_device_train_batch_size", "8",
                    "--eval_steps", "2", "--max_eval_samples", "20", "--per_device_eval_batch_size", "8", *extra)
    args[args.index("--config_overrides"):args.index("--config_overrides") + 2] = THREE_LAYERS
    return main(args)


@pytest.mark.slow  # ~60 s on 2 cores: three runs, two of them compiled (one with --gradient_checkpointing)
def test_compiled_blocks_compile_once_and_match_eager(corpus, tokenizer_dir, job_env, tmp_path, monkeypatch):
    for key in ("TRAINER_CACHE", "HF_DATASETS_CACHE", "HF_HOME", "HF_HUB_OFFLINE"):
        monkeypatch.setenv(key, job_env[key])
    eager = run_in_process(corpus, tokenizer_dir, tmp_path / "eager")
    torch._dynamo.reset()
    counters.clear()
    backend = os.environ.get("TRAINER_TEST_COMPILE_BACKEND", "aot_eager")
    compiled = run_in_process(corpus, tokenizer_dir, tmp_path / "compiled", "--torch_compile",
                              "--torch_compile_backend", backend)
    # aot_eager runs the same kernels; inductor fuses them (other reduction orders, TF32 on a GPU).
    tolerance = 1e-5 if backend == "aot_eager" else 1e-3
    # Two of the three BertLayers compiled (the last one runs on the masked rows, eagerly): one graph for both,
    # through 3 training steps and 3 evaluations (whose batches of 8 and 4 would each have been a recompilation).
    assert counters["stats"]["unique_graphs"] == 1
    assert not counters["graph_break"]
    losses = {run: [r["train_loss"] for r in read_history(tmp_path / run) if "train_loss" in r]
              for run in ("eager", "compiled")}
    assert losses["compiled"] == pytest.approx(losses["eager"], rel=tolerance)
    assert compiled["eval_loss"] == pytest.approx(eager["eval_loss"], rel=tolerance)
    a, b = load_parameters(tmp_path / "eager"), load_parameters(tmp_path / "compiled")
    assert a.keys() == b.keys()  # compiled in place: the parameter names of the eager model
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=10 * tolerance, atol=tolerance / 10)
    # --gradient_checkpointing: the checkpoint is traced into the same single graph, which trains like eager.
    torch._dynamo.reset()
    counters.clear()
    run_in_process(corpus, tokenizer_dir, tmp_path / "checkpointed", "--torch_compile", "--torch_compile_backend",
                   backend, "--gradient_checkpointing")
    assert counters["stats"]["unique_graphs"] == 1 and not counters["graph_break"]
    c = load_parameters(tmp_path / "checkpointed")
    for name in a:
        torch.testing.assert_close(c[name], a[name], rtol=10 * tolerance, atol=tolerance / 10)
