"""trainer.clm runs in-process (main(argv)): training, exact perplexity bookkeeping, probes, pipeline loading."""
import os

import pytest
import yaml

from clm_helpers import bpe_tokenizer_dir, clm_args, corpus  # noqa: F401 (fixtures)
from conftest import read_history, read_results, write_yaml_config
from trainer.clm import main


@pytest.fixture(scope="module")
def trained(corpus, bpe_tokenizer_dir, tmp_path_factory):  # noqa: F811
    """12 steps from scratch on packed documents, with probes, evaluation at step 6 and TensorBoard."""
    out = tmp_path_factory.mktemp("clm") / "run"
    args = clm_args(corpus, bpe_tokenizer_dir, out, "--max_steps", "12", "--per_device_train_batch_size", "8",
                    "--eval_steps", "6", "--packing", "documents", "--max_eval_samples", "24",
                    "--probe_new_tokens", "6", "--report_to", "tensorboard")
    args[args.index("--probe_prompts") + 1] = "the acting was"
    main(args)
    return out


def test_trains_counts_predicted_tokens_and_loads_with_pipeline(trained, corpus, bpe_tokenizer_dir):  # noqa: F811
    from transformers import AutoTokenizer, pipeline

    results = read_results(trained)
    assert results["eval_perplexity"] < results["init_eval_perplexity"] / 1.5 and results["train_steps"] == 12
    # Every evaluation block of 32 tokens predicts 31 of them, less one per document start inside the block.
    tokenizer = AutoTokenizer.from_pretrained(bpe_tokenizer_dir)
    with open(corpus["validation"]) as handle:
        stream = [t for line in handle if line.strip() for t in tokenizer(line)["input_ids"] + [tokenizer.eos_token_id]]
    blocks = [stream[i:i + 32] for i in range(0, 24 * 32, 32)]
    expected = sum(31 - sum(1 for t in block[:-1] if t == tokenizer.eos_token_id) for block in blocks)
    assert results["eval_predicted_tokens"] == results["init_eval_predicted_tokens"] == expected
    generate = pipeline("text-generation", model=str(trained))
    text = generate("the acting was", max_new_tokens=5, do_sample=False)[0]["generated_text"]
    assert text.startswith("the acting was") and len(text) > len("the acting was")


def test_probes_after_each_evaluation_in_the_log_and_tensorboard(trained):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    probes = {r["step"]: r[key] for r in read_history(trained) for key in r if key.endswith("eval_probes")}
    assert sorted(probes) == [0, 6, 12]
    assert all(len(p) == 1 and p[0].startswith("the acting was -> ") for p in probes.values())
    runs = EventAccumulator(os.path.join(trained, "runs"), size_guidance={"tensors": 0}).Reload()
    tags = runs.Tags()["tensors"]
    assert any("probes" in tag for tag in tags), tags


def test_help_lists_the_run_clm_flags(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--model_name_or_path", "--config_name", "--model_type", "--config_overrides", "--tokenizer_name",
                 "--block_size", "--dataset_name", "--dataset_config_name", "--train_file", "--validation_file",
                 "--validation_split_percentage", "--preprocessing_num_workers", "--keep_linebreaks", "--packing",
                 "--finetune_strategy", "--strategy", "--merge_adapters", "--probe_prompts",
                 "--gradient_accumulation_steps", "--bf16"):
        assert flag in text, flag
    assert "--max_seq_length" not in text  # clm's length is --block_size


def test_yaml_config_as_only_argument(corpus, bpe_tokenizer_dir, tmp_path):  # noqa: F811
    out = tmp_path / "from-yaml"
    args = clm_args(corpus, bpe_tokenizer_dir, out, "--max_steps", "2", "--keep_linebreaks", "false",
                    "--attn_implementation", "eager", "--packing", "documents",
                    "--max_eval_samples", "4")
    path = write_yaml_config(args, tmp_path / "run.yaml", drop=("probe_prompts",))
    from trainer.clm import CLM_JOB
    from trainer.config.job_config import parse_job_config

    clm = parse_job_config(CLM_JOB.all_sections, [path]).clm
    assert clm.keep_linebreaks is False and clm.block_size == 32
    main([path])
    assert read_results(out)["train_steps"] == 2


def test_demo_config_is_valid_and_small():
    from trainer.clm import DEMO_CONFIG

    with open(DEMO_CONFIG) as handle:
        demo = yaml.safe_load(handle)
    assert "model_name_or_path" not in demo and "train_file" not in demo  # the offline default
    assert demo["max_steps"] * demo["per_device_train_batch_size"] * demo["block_size"] <= 2_000_000
