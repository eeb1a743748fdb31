"""--gradient_checkpointing (trainer/models/checkpointing.py): every repeated block really runs twice per training
step (with --gradient_checkpointing_every k, every k-th), and training with it ends with the parameters of training
without it, dropout on (the recomputation draws the same masks): mlm (BERT, its sparse last layer checkpointed too),
clm (GPT-2 and Llama, fused loss; Llama with every 2nd block), a LoRA model under the reentrant variant, prefix
tuning, and 2 processes under FSDP2 against 1 process. 2-process DDP and ZeRO-1/2/3 with checkpointing are compared
with runs without it in test_mlm_equivalence.py and test_deepspeed.py.

Attention key biases are left out of the comparisons: they add the same number to every score of a query, so their
gradient is zero in exact arithmetic and only rounding noise, which Adam scales up, moves them.
"""
import functools

import pytest
import torch

from clm_helpers import bpe_tokenizer_dir, clm_args, tiny_gpt2  # noqa: F401 (fixture)
from conftest import accelerate_launch, load_parameters, mlm_args, relative_difference, run_job, with_model
from resume_helpers import DROPOUT_BERT, DROPOUT_GPT2
from trainer.models.checkpointing import checkpoint_blocks, checkpoint_options

TOLERANCE = 1e-5
STEPS = ["--max_steps", "4", "--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "2",
         "--max_eval_samples", "8", "--eval_steps", "100"]
TINY_LLAMA = ["--model_type", "llama", "--config_overrides",
              "hidden_size=32,intermediate_size=64,num_hidden_layers=2,num_attention_heads=2,num_key_value_heads=1,"
              "max_position_embeddings=64,attention_dropout=0.1"]


def without_key_biases(parameters: dict) -> dict:
    kept = {name: value for name, value in parameters.items() if not name.endswith("attention.self.key.bias")}
    for name in [name for name in kept if name.endswith("attn.c_attn.bias")]:  # GPT-2: [query | key | value]
        query, _, value = kept[name].chunk(3)
        kept[name] = torch.cat([query, value])
    return kept


def assert_same_parameters(expected_dir, actual_dir) -> None:
    expected, actual = load_parameters(expected_dir), load_parameters(actual_dir)
    assert expected.keys() == actual.keys()
    difference = relative_difference(without_key_biases(expected), without_key_biases(actual))
    assert difference <= TOLERANCE, f"checkpointed training differs by {difference:.2e}"


@pytest.fixture
def in_process(job_env, monkeypatch):
    for key in ("TRAINER_CACHE", "HF_DATASETS_CACHE", "HF_HOME", "HF_HUB_OFFLINE"):
        monkeypatch.setenv(key, job_env[key])


@pytest.mark.parametrize("job, model, every", [("mlm", DROPOUT_BERT, 1), ("clm", DROPOUT_GPT2, 1),
                                               ("clm", TINY_LLAMA, 2)],
                         ids=["mlm-bert", "clm-gpt2", "clm-llama-every-2nd-block"])
def test_checkpointed_training_ends_with_the_same_parameters(job, model, every, corpus, tokenizer_dir,
                                                             bpe_tokenizer_dir, tmp_path, in_process):
    """Every block checkpointed, or (--gradient_checkpointing_every 2) the first of the two only."""
    from trainer import clm, mlm

    def run(name, *extra):
        if job == "mlm":
            args = mlm_args(corpus, tokenizer_dir, tmp_path / name, *STEPS, *extra)
        else:
            args = clm_args(corpus, bpe_tokenizer_dir, tmp_path / name, *STEPS, *extra)
        return (mlm if job == "mlm" else clm).main(with_model(args, model))

    plain = run("plain")
    checkpointed = run("checkpointed", "--gradient_checkpointing", "--gradient_checkpointing_every", str(every))
    assert_same_parameters(tmp_path / "plain", tmp_path / "checkpointed")
    assert checkpointed["eval_loss"] == pytest.approx(plain["eval_loss"], rel=TOLERANCE)


def count_calls(blocks) -> list:
    """The indices of `blocks` whose forward runs, in order, as they run: inside the checkpointed forward (the
    block's own __call__ stays outside it), so a recomputation is counted too."""
    calls = []
    for index, block in enumerate(blocks):
        # A pre-hook on its first module: the recomputation stops once it has every saved tensor back (torch's
        # early stop), before the last modules' forward hooks.
        block.ln_1.register_forward_pre_hook(lambda *_, index=index: calls.append(index))
    return calls


@pytest.mark.parametrize("every, recomputed", [(1, [0, 1, 2]), (2, [0, 2])])
def test_each_checkpointed_block_runs_again_in_the_backward_and_once_in_evaluation(every, recomputed):
    """--gradient_checkpointing_every k: the 1st, the (k+1)-th, ... block are recomputed, the others not."""
    model = tiny_gpt2(100, n_layer=3).train()
    assert checkpoint_blocks(model, checkpoint_options(None), every) == len(recomputed)
    calls = count_calls(model.transformer.h)
    ids = torch.randint(0, 100, (2, 16))
    model(ids, labels=ids, use_cache=False).loss.backward()
    assert calls == [0, 1, 2] + recomputed[::-1]  # each block in the forward, the checkpointed ones backwards again
    calls.clear()
    with torch.no_grad():
        model.eval()(ids)
    assert calls == [0, 1, 2]


@pytest.mark.parametrize("reentrant", [False, True])
def test_lora_blocks_get_the_gradients_of_the_plain_model(reentrant):
    """LoRA freezes the embeddings: under the reentrant variant the blocks would get no gradient without
    enable_input_require_grads."""
    import peft

    def lora_gradients(checkpointed: bool) -> dict:
        model = peft.get_peft_model(tiny_gpt2(100, n_layer=2), peft.LoraConfig(r=4, target_modules=["c_attn"]))
        if checkpointed:
            options = checkpoint_options(f'{{"use_reentrant": {str(reentrant).lower()}}}')
            checkpoint_blocks(model.base_model.model, options)
        ids = torch.arange(32).view(2, 16)
        model.train()(ids, labels=ids, use_cache=False).loss.backward()
        return {name: p.grad for name, p in model.named_parameters() if p.requires_grad}

    plain, checkpointed = lora_gradients(False), lora_gradients(True)
    assert plain.keys() == checkpointed.keys() and len(plain) == 4
    for name, gradient in plain.items():
        assert checkpointed[name] is not None, name
        torch.testing.assert_close(checkpointed[name], gradient, rtol=1e-5, atol=1e-7)
    assert any(gradient.abs().sum() > 0 for gradient in plain.values())


def test_prefix_tuning_gets_the_gradients_of_the_plain_model_and_refuses_the_reentrant_variant():
    """Prefix tuning hands every block a cache holding its virtual keys and values, which the block appends its own
    to: the recomputation starts from the cache as the forward found it (it would otherwise attend to its keys
    twice and fail on the shapes)."""
    import peft

    from trainer.errors import UsageError

    def prefix_gradients(options: str | None) -> dict:
        torch.manual_seed(0)
        config = peft.PrefixTuningConfig(task_type=peft.TaskType.CAUSAL_LM, num_virtual_tokens=4)
        model = peft.get_peft_model(tiny_gpt2(100, n_layer=2), config)
        if options is not None:
            checkpoint_blocks(model.base_model, checkpoint_options(options))
        ids = torch.arange(32).view(2, 16)
        model.train()(input_ids=ids, labels=ids).loss.backward()
        return {name: p.grad for name, p in model.named_parameters() if p.requires_grad}

    plain, checkpointed = prefix_gradients(None), prefix_gradients("{}")
    assert plain.keys() == checkpointed.keys() and len(plain) == 1
    for name, gradient in plain.items():
        torch.testing.assert_close(checkpointed[name], gradient, rtol=1e-5, atol=1e-7)
        assert gradient.abs().sum() > 0
    with pytest.raises(UsageError, match="use_reentrant true cannot carry gradients to prefix tuning"):
        prefix_gradients('{"use_reentrant": true}')


@pytest.mark.slow  # one 2-process run (~30 s on 2 cores)
def test_fsdp2_with_checkpointing_equals_one_process(corpus, tokenizer_dir, job_env, tmp_path):
    """FSDP2 shards the same blocks that are checkpointed (one unit per BertLayer): 2 processes with checkpointing
    end where 1 process without it does (no dropout, so that world sizes draw nothing differently)."""
    run = functools.partial(run_job, "trainer.mlm", env=job_env)
    steps = ["--max_steps", "4", "--gradient_accumulation_steps", "2", "--max_eval_samples", "8"]
    run(mlm_args(corpus, tokenizer_dir, tmp_path / "one", *steps, "--per_device_train_batch_size", "4"))
    result = run(mlm_args(corpus, tokenizer_dir, tmp_path / "fsdp", *steps, "--per_device_train_batch_size", "2",
                          "--gradient_checkpointing"), nproc=2, launcher=accelerate_launch("cpu_fsdp2.yaml"))
    log = result.stdout + result.stderr
    assert "with FSDP2 (gloo)" in log and "gradient checkpointing" in log
    assert_same_parameters(tmp_path / "one", tmp_path / "fsdp")
