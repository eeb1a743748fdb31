"""Command-line arguments shared by every job: model, data and the training engine.

The names follow the transformers `run_mlm.py` example and `TrainingArguments`, so an existing command line
keeps working. Each field's help text is what `--help` prints. Validation that needs only the arguments
themselves lives in `__post_init__`; everything fails as a `UsageError` (one line, exit code 2).
"""
from __future__ import annotations

import math
import os
import signal
from dataclasses import dataclass
from typing import Optional

from trainer.config.parsing import arg
from trainer.errors import require
from trainer.layout import FISHER_FILE, checkpoint_name
from trainer.tracking import tracker_names

DATA_FILE_EXTENSIONS = {".txt": "text", ".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}


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
    # continual learning: replay
    replay_file: Optional[str] = arg(
        None, "Experience replay: an earlier task's training data (same formats and columns as --train_file; for "
        "classify, labels among the training data's), prepared exactly as the training data and mixed into every "
        "global batch at --replay_ratio. The replay samples follow their own seeded order, cycling over the file, "
        "the same at any world size; checkpoints keep its position.")
    replay_ratio: Optional[float] = arg(
        None, "With --replay_file: the fraction R of every global batch of G sequences (per-device batch x processes "
        "x accumulation) taken from it: round(R x G) replay samples per step, halves up, and the rest new ones (at "
        "least one of each). An epoch is a pass over the new data alone.")

    def __post_init__(self):
        require(not (self.dataset_name and self.train_file), "give either --dataset_name or --train_file, not both")
        for flag in ("train_file", "validation_file", "replay_file"):
            path = getattr(self, flag)
            if path is not None:
                check_data_file(path, flag)
        require(0 < self.validation_split_percentage < 100, "--validation_split_percentage must be in 1..99")
        for flag in ("preprocessing_num_workers", "max_train_samples", "max_eval_samples"):
            value = getattr(self, flag)
            require(value is None or value > 0, f"--{flag} must be positive, got {value}")
        require((self.replay_file is None) == (self.replay_ratio is None),
                "--replay_file and --replay_ratio go together: give both (e.g. --replay_ratio 0.25) or neither")
        require(self.replay_ratio is None or 0 < self.replay_ratio < 1,
                f"--replay_ratio must be between 0 and 1 (exclusive), got {self.replay_ratio}")


@dataclass
class DataArguments(CorpusArguments):
    max_seq_length: int = arg(128, "Tokens per training sequence (must not exceed the model's positions).")

    def __post_init__(self):
        super().__post_init__()
        require(self.max_seq_length > 0, "--max_seq_length must be positive")


def check_data_file(path: str, flag: str) -> None:
    require(os.path.exists(path) or not os.path.islink(path), f"--{flag} {path} is a broken symbolic link (its "
                                                              f"target is missing, or a symbolic link loop)")
    require(os.path.exists(path), f"--{flag} {path}: no such file")
    require(not os.path.isdir(path), f"--{flag} {path} is a directory; give a file")
    extension = os.path.splitext(path)[1].lower()
    require(extension in DATA_FILE_EXTENSIONS,
            f"--{flag} {path}: unsupported extension '{extension}'; use one of {', '.join(DATA_FILE_EXTENSIONS)}")
    require(os.access(path, os.R_OK), f"--{flag} {path} is not readable; check its permissions")
    require(os.path.getsize(path) > 0, f"--{flag} {path} is empty")
    if DATA_FILE_EXTENSIONS[extension] == "text":
        check_holds_text_lines(path, flag)


TEXT_SCAN_CHUNK = 1 << 20
MAX_FIRST_LINE_BYTES = 64 << 20
NOT_TEXT = b"\x00 \t\n\r\x0b\x0c"  # NUL and ASCII whitespace
UTF8_BOM = b"\xef\xbb\xbf"


def check_holds_text_lines(path: str, flag: str) -> None:
    """A .txt corpus holds some character other than NUL, whitespace and BOMs, and its first line ends within
    MAX_FIRST_LINE_BYTES. datasets' text loader reads a whole line into memory before anything else happens, so a
    multi-GB file with no newline (e.g. a sparse file of NULs) would run for minutes in unbounded memory, and a file
    of only blanks fails deep inside tokenization. The scan stops once it has seen a text byte and a newline, so a
    real corpus costs one chunk's read."""
    seen_text = seen_newline = False
    carried, read = b"", 0  # the start of a BOM cut by the chunk's end
    with open(path, "rb") as handle:
        while not (seen_text and seen_newline):
            chunk = handle.read(TEXT_SCAN_CHUNK)
            if not chunk:
                break
            read += len(chunk)
            seen_newline = seen_newline or b"\n" in chunk
            rest = (carried + chunk.translate(None, NOT_TEXT)).replace(UTF8_BOM, b"")
            carried = rest if UTF8_BOM.startswith(rest) else b""
            seen_text = seen_text or not UTF8_BOM.startswith(rest)
            require(seen_newline or read <= MAX_FIRST_LINE_BYTES,
                    f"--{flag} {path}: its first line is longer than {MAX_FIRST_LINE_BYTES >> 20} MiB (no newline); "
                    f"a .txt corpus holds one text per line: split it into lines")
    require(seen_text, f"--{flag} {path} holds no text (only blank lines, NUL bytes or byte-order marks); give a "
                       f"file with text in it")


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
    save_steps: Optional[int] = arg(None, f"Save a checkpoint (output_dir/{checkpoint_name('<step>')}) every N "
                                          f"optimizer steps; one is always saved at the end.")
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
    report_to: str = arg("tensorboard", "Trackers that get the metrics, besides the log: a comma list of "
                         "tensorboard, wandb, mlflow, trackio; all (every one whose package is installed) or none.")
    run_name: Optional[str] = arg(None, "The run's name in W&B, MLflow and trackio. Unset: the --output_dir folder "
                                        "name.")
    push_to_hub: bool = arg(False, "Upload the model (and a model card) to the Hugging Face Hub; rank 0 only, in "
                                   "the background.")
    hub_model_id: Optional[str] = arg(None, "Hub repository (user/name). Unset: the --output_dir folder name.")
    hub_token: Optional[str] = arg(None, "Hub token (default: the HF_TOKEN environment variable). Never logged.")
    hub_private_repo: bool = arg(False, "Create the Hub repository as private.")
    hub_strategy: str = arg("end", "When to push: end (the final model), or every_save (each checkpoint too).",
                            choices=["end", "every_save"])
    dataloader_num_workers: Optional[int] = arg(
        None, "Data loading worker processes per rank. Unset: none on the CPU; on a GPU up to 4 (the cores per "
        "process less one), so that masking and collation run beside the training process.")
    ddp_timeout: int = arg(10800, "Seconds a collective may wait, e.g. while rank 0 tokenizes a big corpus.")
    use_cpu: bool = arg(False, "Train on the CPU even if a GPU is present.")
    torch_compile: bool = arg(False, "Compile the model's transformer blocks with torch.compile, one by one, on "
                                     "fixed shapes (see trainer/models/compilation.py). Compilation takes a minute or more "
                                     "up front; it pays on long GPU runs.")
    torch_compile_backend: str = arg("inductor", "torch.compile backend with --torch_compile (e.g. inductor, "
                                                 "aot_eager for debugging).")
    torch_compile_mode: str = arg("default", "torch.compile mode with --torch_compile: default, reduce-overhead "
                                             "(CUDA graphs: fewer kernel launches), max-autotune (also searches "
                                             "matrix-product kernels; long compile), max-autotune-no-cudagraphs.",
                                  choices=["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"])
    peak_tflops: Optional[float] = arg(None, "The device's peak TFLOP/s that MFU divides by. Unset: the datasheet "
                                             "dense peak for the GPU and precision (e.g. 989.5 for an H100 SXM in "
                                             "bf16); on a device without one (a CPU), a measured matrix-product rate.")
    local_rank: int = arg(-1, "Passed by the `deepspeed` launcher as --local_rank=N; accepted and ignored (the "
                              "LOCAL_RANK environment variable it also sets is what counts).")
    deepspeed: Optional[str] = arg(None, "DeepSpeed config JSON (e.g. ds_configs/zero2.json): train with DeepSpeed "
                                         "ZeRO. Its \"auto\" values are filled from these arguments.")
    # continual learning: EWC
    save_fisher: bool = arg(False, f"After training, write {FISHER_FILE} beside the model: the diagonal empirical "
                                   "Fisher information of the trainable parameters over --fisher_samples training "
                                   "samples and the final weights as the anchor, for a later run's --ewc_from.")
    fisher_samples: int = arg(512, "Training samples (the first N in dataset order, each rank a shard) whose squared "
                                   "per-sample gradients average into the Fisher information of --save_fisher.")
    ewc_from: Optional[str] = arg(None, f"Elastic Weight Consolidation: the output directory of an earlier task's run "
                                        f"with --save_fisher ({FISHER_FILE} inside). Adds (L/2) sum_i F_i (theta_i - "
                                        f"theta*_i)^2 to the loss, once per optimizer step; logged as "
                                        f"train_ewc_penalty. Needs --ewc_lambda.")
    ewc_lambda: Optional[float] = arg(None, "L, the EWC penalty's strength with --ewc_from (>= 0; no default: it "
                                            "depends on the Fisher's scale). Larger keeps the earlier task better and "
                                            "learns the new one less; try powers of ten against both tasks' metrics.")

    def __post_init__(self):
        tracker_names(self.report_to)
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
        require(math.isfinite(self.learning_rate) and self.learning_rate > 0,
                f"--learning_rate must be a positive number, got {self.learning_rate}")
        for flag in ("adam_beta1", "adam_beta2"):
            require(0 <= getattr(self, flag) < 1, f"--{flag} must be in [0, 1), got {getattr(self, flag)}")
        for flag in ("adam_epsilon", "weight_decay"):
            require(getattr(self, flag) >= 0, f"--{flag} must be >= 0, got {getattr(self, flag)}")
        require(0 <= self.seed < 2 ** 32, f"--seed must be in 0..{2 ** 32 - 1} (numpy's range), got {self.seed}")
        require(0 <= self.warmup_ratio < 1 and self.warmup_steps >= 0, "warmup must be non-negative and below 1")
        require(self.max_grad_norm >= 0, "--max_grad_norm must be >= 0")
        require(not (self.bf16 and self.fp16), "choose one of --bf16 and --fp16")
        require(self.dataloader_num_workers is None or self.dataloader_num_workers >= 0,
                "--dataloader_num_workers must be >= 0")
        for name in self.stop_signals:
            require(name in signal.Signals.__members__ and name not in ("SIGKILL", "SIGSTOP"),
                    f"--stop_signals: {name} is not a signal this job can catch (e.g. SIGTERM, SIGUSR1)")
        require(self.resume_from_checkpoint is None or self.resume_from_checkpoint == "latest"
                or os.path.isdir(self.resume_from_checkpoint),
                f"--resume_from_checkpoint {self.resume_from_checkpoint}: no such directory (give a checkpoint "
                f"directory or 'latest')")
        require(self.deepspeed is None or os.path.isfile(self.deepspeed), f"--deepspeed {self.deepspeed}: no such file")
        self.check_ewc()

    def check_ewc(self) -> None:
        require(self.fisher_samples > 0, f"--fisher_samples must be positive, got {self.fisher_samples}")
        require((self.ewc_from is None) == (self.ewc_lambda is None),
                "--ewc_from DIR and --ewc_lambda L go together: give both (EWC) or neither")
        if self.ewc_from is None:
            return
        require(math.isfinite(self.ewc_lambda) and self.ewc_lambda >= 0,
                f"--ewc_lambda must be a number >= 0, got {self.ewc_lambda}")
        require(os.path.isdir(self.ewc_from), f"--ewc_from {self.ewc_from}: no such directory")
        require(os.path.isfile(os.path.join(self.ewc_from, FISHER_FILE)),
                f"--ewc_from {self.ewc_from} holds no {FISHER_FILE}; train the earlier task with --save_fisher")

    def choose_best_metric(self, job_default: str) -> None:
        """Fill --metric_for_best_model with the job's main metric and infer its direction when not given."""
        self.metric_for_best_model = self.metric_for_best_model or job_default
        if self.greater_is_better is None:
            self.greater_is_better = not any(word in self.metric_for_best_model for word in ("loss", "perplexity"))

    @property
    def mixed_precision(self) -> str:
        return "bf16" if self.bf16 else "fp16" if self.fp16 else "no"


