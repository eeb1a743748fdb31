"""Command-line arguments shared by every job: model, data and the training engine.

The names follow the transformers `run_mlm.py` example and `TrainingArguments`, so an existing command line
keeps working. Each field's help text is what `--help` prints. Validation that needs only the arguments
themselves lives in `__post_init__`; everything fails as a `UsageError` (one line, exit code 2).
"""
from __future__ import annotations

import dataclasses
import os
import signal
import sys
from dataclasses import dataclass, field
from typing import Optional

from trainer.errors import UsageError, require

DATA_FILE_EXTENSIONS = {".txt": "text", ".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}


def arg(default, help: str, **kwargs):
    """A dataclass field whose help text shows in `--help`."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help, **kwargs})
    return field(default=default, metadata={"help": help, **kwargs})


@dataclass
class ModelArguments:
    model_name_or_path: Optional[str] = arg(
        None, "Local model directory or Hub model id to start from. Leave unset to train from scratch.")
    config_name: Optional[str] = arg(None, "Config (directory or Hub id) for a model trained from scratch.")
    model_type: Optional[str] = arg(
        None, "Architecture for a model trained from scratch (e.g. bert, roberta, gpt2, llama). Unset, with no "
        "model or config given: the job's tiny preset (BERT for mlm and classify, GPT-2 for clm).")
    config_overrides: Optional[str] = arg(
        None, "Comma-separated config changes for a model trained from scratch, e.g. "
        "'num_hidden_layers=4,hidden_size=256'.")
    tokenizer_name: Optional[str] = arg(
        None, "Tokenizer (directory or Hub id) if not the model's. With neither this nor a model given, one is "
        "trained on the training text (WordPiece for mlm and classify, byte-level BPE for clm).")
    tokenizer_vocab_size: int = arg(8000, "Vocabulary size of a tokenizer trained on the training text.")
    attn_implementation: Optional[str] = arg(
        None, "Attention kernel: sdpa (transformers' default), eager, or flash_attention_2 (needs the flash-attn "
        "package and a GPU; clm's --packing documents then takes its variable-length path).",
        choices=["sdpa", "eager", "flash_attention_2"])

    def __post_init__(self):
        require(not (self.config_overrides and self.model_name_or_path),
                "--config_overrides only applies to a model trained from scratch; drop it or drop "
                "--model_name_or_path")
        require(self.tokenizer_vocab_size >= 100, "--tokenizer_vocab_size must be at least 100")


@dataclass
class CorpusArguments:
    """Where the text comes from and how much of it is used: what every job shares. How long a sequence is
    belongs to the job: `DataArguments.max_seq_length` (mlm, classify), `ClmArguments.block_size` (clm)."""

    dataset_name: Optional[str] = arg(None, "Hub dataset name (needs network). Unset with no --train_file: "
                                            "the embedded offline demo corpus.")
    dataset_config_name: Optional[str] = arg(None, "Configuration of --dataset_name.")
    train_file: Optional[str] = arg(None, "Training data: .txt, .json/.jsonl, .csv or .parquet.")
    validation_file: Optional[str] = arg(None, "Evaluation data, same formats. Unset: split off the training data.")
    text_column: Optional[str] = arg(None, "Column holding the text (default: 'text', or the only/first string "
                                           "column).")
    validation_split_percentage: int = arg(5, "Percent of the training data held out for evaluation when no "
                                              "validation data is given.")
    preprocessing_num_workers: Optional[int] = arg(None, "Processes for tokenization.")
    overwrite_cache: bool = arg(False, "Tokenize again instead of reusing the datasets cache.")
    max_train_samples: Optional[int] = arg(None, "Keep only this many training sequences (debugging).")
    max_eval_samples: Optional[int] = arg(None, "Keep only this many evaluation sequences (debugging).")

    def __post_init__(self):
        require(not (self.dataset_name and self.train_file), "give either --dataset_name or --train_file, not both")
        for flag in ("train_file", "validation_file"):
            path = getattr(self, flag)
            if path is not None:
                check_data_file(path, flag)
        require(0 < self.validation_split_percentage < 100, "--validation_split_percentage must be in 1..99")
        for flag in ("preprocessing_num_workers", "max_train_samples", "max_eval_samples"):
            value = getattr(self, flag)
            require(value is None or value > 0, f"--{flag} must be positive, got {value}")


@dataclass
class DataArguments(CorpusArguments):
    max_seq_length: int = arg(128, "Tokens per training sequence (must not exceed the model's positions).")

    def __post_init__(self):
        super().__post_init__()
        require(self.max_seq_length > 0, "--max_seq_length must be positive")


def check_data_file(path: str, flag: str) -> None:
    require(os.path.exists(path), f"--{flag} {path}: no such file")
    require(not os.path.isdir(path), f"--{flag} {path} is a directory; give a file")
    extension = os.path.splitext(path)[1].lower()
    require(extension in DATA_FILE_EXTENSIONS,
            f"--{flag} {path}: unsupported extension '{extension}'; use one of {', '.join(DATA_FILE_EXTENSIONS)}")
    require(os.access(path, os.R_OK), f"--{flag} {path} is not readable; check its permissions")
    require(os.path.getsize(path) > 0, f"--{flag} {path} is empty")


@dataclass
class TrainingArguments:
    output_dir: str = arg("output", "Where the model, logs, TensorBoard runs and checkpoints go.")
    overwrite_output_dir: bool = arg(False, "Allow writing into a non-empty --output_dir.")
    per_device_train_batch_size: int = arg(8, "Sequences per process per micro-step.")
    per_device_eval_batch_size: int = arg(8, "Sequences per process per evaluation batch.")
    gradient_accumulation_steps: int = arg(1, "Micro-steps per optimizer step.")
    learning_rate: float = arg(5e-5, "Peak AdamW learning rate.")
    weight_decay: float = arg(0.0, "AdamW weight decay (never applied to biases and norm weights).")
    adam_beta1: float = arg(0.9, "AdamW beta1.")
    adam_beta2: float = arg(0.999, "AdamW beta2.")
    adam_epsilon: float = arg(1e-8, "AdamW epsilon.")
    lr_scheduler_type: str = arg("linear", "Learning-rate schedule after warmup: linear, cosine or constant.",
                                 choices=["linear", "cosine", "constant"])
    warmup_steps: int = arg(0, "Linear warmup steps (wins over --warmup_ratio).")
    warmup_ratio: float = arg(0.0, "Warmup as a fraction of all optimizer steps.")
    num_train_epochs: float = arg(3.0, "Epochs to train (ignored when --max_steps is set).")
    max_steps: int = arg(-1, "Optimizer steps to train; -1 means use --num_train_epochs.")
    max_grad_norm: float = arg(1.0, "Gradient clipping norm; 0 disables clipping.")
    bf16: bool = arg(False, "bfloat16 autocast (CPU and GPU).")
    fp16: bool = arg(False, "float16 autocast with loss scaling (GPU only).")
    seed: int = arg(42, "Seed for initialisation, shuffling and masking.")
    logging_steps: int = arg(50, "Log loss, learning rate, grad norm and throughput every N optimizer steps.")
    eval_steps: Optional[int] = arg(None, "Evaluate every N optimizer steps (always at the start and the end).")
    save_steps: Optional[int] = arg(None, "Save a checkpoint (output_dir/checkpoint-<step>) every N optimizer steps; "
                                          "one is always saved at the end.")
    save_total_limit: Optional[int] = arg(None, "Keep only the newest N checkpoints (plus the best one with "
                                                "--load_best_model_at_end).")
    load_best_model_at_end: bool = arg(False, "Keep the checkpoint with the best --metric_for_best_model out of the "
                                              "rotation and make it the final model. Evaluates at every save.")
    metric_for_best_model: Optional[str] = arg(None, "Evaluation metric that picks the best checkpoint. Unset: the "
                                                     "job's main metric (eval_perplexity for mlm, eval_accuracy for "
                                                     "classify).")
    greater_is_better: Optional[bool] = arg(None, "Whether a larger --metric_for_best_model is better. Unset: "
                                                  "False for loss/perplexity metrics, True otherwise.")
    resume_from_checkpoint: Optional[str] = arg(
        None, "A checkpoint directory to resume from, or 'latest' for the newest complete one in --output_dir. "
        "Unset: an --output_dir holding checkpoints resumes from its newest complete one.")
    stop_signals: list[str] = arg(["SIGTERM", "SIGUSR1", "SIGUSR2"], "Signals that make the job save a checkpoint "
                                  "at the next optimizer step and exit with code 0.", nargs="*")
    report_to: str = arg("tensorboard", "Where metrics go besides the log: tensorboard or none.",
                         choices=["tensorboard", "none"])
    push_to_hub: bool = arg(False, "Upload the model (and a model card) to the Hugging Face Hub; rank 0 only, in "
                                   "the background.")
    hub_model_id: Optional[str] = arg(None, "Hub repository (user/name). Unset: the --output_dir folder name.")
    hub_token: Optional[str] = arg(None, "Hub token (default: the HF_TOKEN environment variable). Never logged.")
    hub_private_repo: bool = arg(False, "Create the Hub repository as private.")
    hub_strategy: str = arg("end", "When to push: end (the final model), or every_save (each checkpoint too).",
                            choices=["end", "every_save"])
    dataloader_num_workers: int = arg(0, "Data loading worker processes per rank.")
    ddp_timeout: int = arg(10800, "Seconds a collective may wait, e.g. while rank 0 tokenizes a big corpus.")
    use_cpu: bool = arg(False, "Train on the CPU even if a GPU is present.")
    torch_compile: bool = arg(False, "Compile the model with torch.compile (inductor). Compilation takes a minute or "
                                     "more up front; it pays on long GPU runs.")
    peak_tflops: Optional[float] = arg(None, "The device's peak TFLOP/s for MFU (e.g. 989 for an H100 in bf16). "
                                             "Unset: measured as the best rate of a large matrix product.")
    local_rank: int = arg(-1, "Passed by the `deepspeed` launcher as --local_rank=N; accepted and ignored (the "
                              "LOCAL_RANK environment variable it also sets is what counts).")
    deepspeed: Optional[str] = arg(None, "DeepSpeed config JSON (e.g. ds_configs/zero2.json): train with DeepSpeed "
                                         "ZeRO. Its \"auto\" values are filled from these arguments.")

    def __post_init__(self):
        for flag in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps",
                     "logging_steps", "ddp_timeout"):
            value = getattr(self, flag)
            require(value > 0, f"--{flag} must be positive, got {value}")
        for flag in ("eval_steps", "save_steps", "save_total_limit"):
            value = getattr(self, flag)
            require(value is None or value > 0, f"--{flag} must be positive, got {value}")
        require(self.max_steps > 0 or self.max_steps == -1, f"--max_steps must be positive (or -1), got "
                                                            f"{self.max_steps}")
        require(self.max_steps > 0 or self.num_train_epochs > 0,
                f"--num_train_epochs must be positive, got {self.num_train_epochs}")
        require(self.learning_rate > 0, f"--learning_rate must be positive, got {self.learning_rate}")
        require(0 <= self.warmup_ratio < 1 and self.warmup_steps >= 0, "warmup must be non-negative and below 1")
        require(self.max_grad_norm >= 0, "--max_grad_norm must be >= 0")
        require(not (self.bf16 and self.fp16), "choose one of --bf16 and --fp16")
        require(self.dataloader_num_workers >= 0, "--dataloader_num_workers must be >= 0")
        for name in self.stop_signals:
            require(name in signal.Signals.__members__ and name not in ("SIGKILL", "SIGSTOP"),
                    f"--stop_signals: {name} is not a signal this job can catch (e.g. SIGTERM, SIGUSR1)")
        require(self.resume_from_checkpoint is None or self.resume_from_checkpoint == "latest"
                or os.path.isdir(self.resume_from_checkpoint),
                f"--resume_from_checkpoint {self.resume_from_checkpoint}: no such directory (give a checkpoint "
                f"directory or 'latest')")
        require(self.deepspeed is None or os.path.isfile(self.deepspeed), f"--deepspeed {self.deepspeed}: no such file")

    def choose_best_metric(self, job_default: str) -> None:
        """Fill --metric_for_best_model with the job's main metric and infer its direction when not given."""
        self.metric_for_best_model = self.metric_for_best_model or job_default
        if self.greater_is_better is None:
            self.greater_is_better = not any(word in self.metric_for_best_model for word in ("loss", "perplexity"))

    @property
    def mixed_precision(self) -> str:
        return "bf16" if self.bf16 else "fp16" if self.fp16 else "no"


def parse_arguments(dataclass_types, argv: list[str] | None = None, default_config: str | None = None):
    """Parse the command line into the given dataclasses.

    A single `.yaml`/`.json` argument is read as a config file. With no arguments at all and a
    `default_config`, that packaged config is used: it is the job's embedded offline demo.
    """
    from transformers import HfArgumentParser

    argv = sys.argv[1:] if argv is None else argv
    if not argv and default_config:
        argv = [default_config]
    if len(argv) == 1 and argv[0].endswith((".yaml", ".yml", ".json")):
        argv = config_file_as_argv(argv[0])
    return HfArgumentParser(dataclass_types).parse_args_into_dataclasses(argv)


def config_file_as_argv(path: str) -> list[str]:
    """A config file's keys as command-line flags, so argparse converts and checks them exactly as it does flags
    (HfArgumentParser.parse_yaml_file would pass YAML strings such as '5e-5' through unconverted)."""
    import json

    import yaml

    require(os.path.isfile(path), f"config file {path} not found")
    try:
        with open(path) as handle:
            config = json.load(handle) if path.endswith(".json") else yaml.safe_load(handle)
    except (ValueError, yaml.YAMLError) as error:
        raise UsageError(f"config file {path} is not valid: {str(error).splitlines()[0]}") from None
    require(isinstance(config, dict), f"config file {path} must hold a mapping of argument names to values")
    argv = []
    for key, value in config.items():
        if value is None:
            continue
        values = value if isinstance(value, list) else [value]
        argv += [f"--{key}", *(str(v) for v in values)]
    return argv


def as_dict(*argument_objects) -> dict:
    """All arguments as one flat dict (for logs and the trainer state), with any token redacted."""
    merged = {}
    for obj in argument_objects:
        merged.update(dataclasses.asdict(obj))
    return {key: "<redacted>" if "token" in key and value else value for key, value in merged.items()}
