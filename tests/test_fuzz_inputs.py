"""Odd and bad input, as a fuzzer would try it: the guarantee of README's "Clear failures".

Each case ends one of two ways, never with a traceback:
- usable input: exit code 0 and a trained model (`model.safetensors`) after one optimizer step;
- bad input: exit code 2, stderr whose only line is `error: ...` (progress bars of earlier work aside, see
  `error_line`), and nothing written: the output directory is not created, and a path given as output stays
  exactly as it was.

The jobs run in this process (`main(argv)`; torch is imported once), except for a few real subprocesses that
prove the process-level behaviour (exit code, stderr) and the 2-process torchrun cases.
"""
from __future__ import annotations

import glob
import json
import os
import sys
from dataclasses import dataclass

import pytest

from classify_helpers import classify_args, sentiment  # noqa: F401
from clm_helpers import TINY_GPT2_FLAGS, bpe_tokenizer_dir, clm_args, gpt2_checkpoint  # noqa: F401
from conftest import REPO_ROOT, TINY_BERT, free_port, mlm_args, mounted_tmpfs, run_job
from prepare_helpers import prepare_args, prepared_classify, prepared_mlm  # noqa: F401
from trainer.config.parsing import arg

KB = 1024


# ------------------------------------------------------------------------------------------------ running jobs
def run_main(main, argv, capsys) -> tuple[int, str, str]:
    """(exit code, stderr, stdout) of an in-process job run."""
    capsys.readouterr()
    try:
        main(argv)
        code = 0
    except SystemExit as stop:
        code = stop.code if isinstance(stop.code, int) else 1
    captured = capsys.readouterr()
    return code, captured.err, captured.out


def error_line(err: str) -> str:
    """The one `error:` line, which must end stderr; lines before it may only be progress bars (`\\r` updates
    of work that was under way, e.g. tokenizing)."""
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], err
    assert all("%|" in line or "it/s" in line or "s/it" in line for line in lines[:-1]), err
    return errors[0]


def snapshot(path) -> dict | None:
    """What lies at `path` (file contents, or a directory's tree), to prove a failed run left it alone."""
    if not os.path.lexists(path):
        return None
    if os.path.islink(path) or not os.path.isdir(path):
        return {"link": os.readlink(path)} if os.path.islink(path) else {"file": open(path, "rb").read()}
    return {name: snapshot(os.path.join(path, name)) for name in sorted(os.listdir(path))}


@pytest.fixture
def env(job_env, monkeypatch):
    for key in ("TRAINER_CACHE", "HF_DATASETS_CACHE", "HF_HUB_OFFLINE", "TOKENIZERS_PARALLELISM"):
        monkeypatch.setenv(key, job_env[key])


def check_outcome(main, argv, output_dir, expected, capsys, before=None) -> None:
    """`expected` is "ok" (trained) or a substring of the one error line."""
    code, err, _ = run_main(main, argv, capsys)
    if expected == "ok":
        assert code == 0, err[-3000:]
        assert os.path.isfile(os.path.join(output_dir, "model.safetensors"))
        return
    assert code == 2, err[-3000:]
    assert expected in error_line(err)
    assert snapshot(output_dir) == before, "a failed run must not write or change its output"


# ---------------------------------------------------------------------------------------------- data files
def corpus_lines(corpus, n: int = 60) -> list[str]:
    with open(corpus["train"]) as handle:
        return [next(handle).rstrip("\n") for _ in range(n)]


def write_bytes(path, data: bytes) -> str:
    with open(path, "wb") as handle:
        handle.write(data)
    return str(path)


def jsonl(rows) -> bytes:
    return "".join(json.dumps(row) + "\n" for row in rows).encode()


def parquet(path, columns: dict) -> str:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table(columns), path)
    return str(path)


def csv_quoted(lines) -> bytes:
    rows = [f'"{line.replace(chr(34), chr(34) * 2)}, ""quoted""\nsecond line",{i % 2}' for i, line in enumerate(lines)]
    return ("text,label\n" + "\n".join(rows) + "\n").encode()


def make_data_file(case: str, directory, lines: list[str]) -> str:
    """The training file of data case `case` (lines: usable text)."""
    text = "\n".join(lines)
    big_line = " ".join(lines * (2 * KB * KB // len(text)))  # one line of about 2 MB
    d = directory
    makers = {
        "crlf": lambda: write_bytes(d / "crlf.txt", text.replace("\n", "\r\n").encode() + b"\r\n"),
        "bom": lambda: write_bytes(d / "bom.txt", b"\xef\xbb\xbf" + text.encode() + b"\n"),
        "no_final_newline": lambda: write_bytes(d / "nonl.txt", text.encode()),
        "nul_bytes": lambda: write_bytes(d / "nul.txt", text.replace(" ", " \x00").encode()),
        "one_huge_line": lambda: write_bytes(d / "huge.txt", big_line.encode()),
        "blank_lines": lambda: write_bytes(d / "blank.txt", ("\n\n  \n" + text.replace("\n", "\n\n\t\n")).encode()),
        "jsonl_nulls": lambda: write_bytes(d / "nulls.jsonl", jsonl({"text": t if i % 3 else None}
                                                                    for i, t in enumerate(lines))),
        "jsonl_extra_mixed": lambda: write_bytes(d / "mixed.jsonl", jsonl({"text": t, "meta": [i, "x", None][i % 3]}
                                                                          for i, t in enumerate(lines))),
        "jsonl_other_name": lambda: write_bytes(d / "body.jsonl", jsonl({"id": i, "body": t}
                                                                        for i, t in enumerate(lines))),
        "csv_quoting": lambda: write_bytes(d / "quoted.csv", csv_quoted(lines)),
        "parquet": lambda: parquet(d / "ok.parquet", {"text": lines}),
        "symlink": lambda: symlink(d / "link.txt", write_bytes(d / "target.txt", text.encode())),
        # bad ones
        "empty": lambda: write_bytes(d / "empty.txt", b""),
        "whitespace_only": lambda: write_bytes(d / "ws.txt", b" \n\t\n\r\n" * 50),
        "nul_only": lambda: write_bytes(d / "nul_only.txt", b"\x00" * 5000),
        "newlines_only": lambda: write_bytes(d / "newlines.txt", b"\n" * 5000),
        "boms_only": lambda: write_bytes(d / "boms.txt", b"\xef\xbb\xbf" * (KB * KB)),  # chunks cut BOMs in two
        "sparse_nul_2gb": lambda: sparse_file(d / "sparse.txt", 2 * KB ** 3),
        "blank_run_then_text": lambda: write_bytes(d / "blank_run.txt", b" \n" * 3000 + text.encode() + b"\n"),
        "one_line": lambda: write_bytes(d / "one.txt", b"just one short line\n"),
        "invalid_utf8": lambda: write_bytes(d / "latin1.txt", "caf\xe9 cr\xe8me\n".encode("latin-1") * 40),
        "random_bytes": lambda: write_bytes(d / "noise.txt", bytes(range(256)) * 64),
        "jsonl_object_text": lambda: write_bytes(d / "object.jsonl", jsonl({"text": {"en": t}} for t in lines)),
        "jsonl_number_text": lambda: write_bytes(d / "number.jsonl", jsonl({"text": i} for i in range(60))),
        "jsonl_list_text": lambda: write_bytes(d / "list.jsonl", jsonl({"text": t.split()} for t in lines)),
        "jsonl_mixed_text": lambda: write_bytes(d / "mixedtext.jsonl", jsonl({"text": [t, 5][i % 2]}
                                                                             for i, t in enumerate(lines))),
        "jsonl_all_null": lambda: write_bytes(d / "allnull.jsonl", jsonl({"text": None} for _ in lines)),
        "jsonl_truncated": lambda: write_bytes(d / "cut.jsonl", jsonl({"text": t} for t in lines)[:-7]),
        "jsonl_lone_surrogate": lambda: write_bytes(d / "surrogate.jsonl", b'{"text": "\\ud800 half a pair"}\n' * 40),
        "json_top_level_list": lambda: write_bytes(d / "list.json", json.dumps(lines).encode()),
        "csv_empty_text": lambda: write_bytes(d / "emptytext.csv", b"text,label\n" + b",1\n" * 60),
        "csv_ragged": lambda: write_bytes(d / "ragged.csv", b"text,label\na,1\nb,2,3,4\n" * 30),
        "parquet_without_text": lambda: parquet(d / "numbers.parquet", {"score": list(range(60))}),
        "parquet_garbage": lambda: write_bytes(d / "garbage.parquet", b"PAR1 not really parquet"),
        "symlink_loop": lambda: symlink(d / "loop.txt", d / "loop.txt"),
        "dangling_symlink": lambda: symlink(d / "dangling.txt", d / "nowhere.txt"),
        "directory": lambda: str(mkdir(d / "adir.txt")),
    }
    return makers[case]()


def sparse_file(path, size: int) -> str:
    """A file of `size` NUL bytes that takes no disk space (a hole)."""
    with open(path, "wb") as handle:
        handle.truncate(size)
    return str(path)


def symlink(link, target) -> str:
    os.symlink(target, link)
    return str(link)


def mkdir(path):
    os.makedirs(path)
    return path


DATA_CASES = [
    ("crlf", "ok"), ("bom", "ok"), ("no_final_newline", "ok"), ("nul_bytes", "ok"), ("one_huge_line", "ok"),
    ("blank_lines", "ok"), ("jsonl_nulls", "ok"), ("jsonl_extra_mixed", "ok"), 
    ("csv_quoting", "ok"), ("parquet", "ok"), ("symlink", "ok"),
    ("empty", "is empty"),
    ("whitespace_only", "holds no text"),
    ("nul_only", "holds no text"),
    ("newlines_only", "holds no text"),
    ("boms_only", "holds no text"),
    ("sparse_nul_2gb", "its first line is longer than 64 MiB"),
    ("blank_run_then_text", "ok"),
    ("one_line", "too few"),
    ("invalid_utf8", "could not be read as text"),
    ("random_bytes", "could not be read as text"),
    ("jsonl_object_text", "not text"),
    ("jsonl_number_text", "not text"),
    ("jsonl_list_text", "not text"),
    ("jsonl_mixed_text", "not text"),
    ("jsonl_other_name", "has no column 'body'"),
    ("jsonl_all_null", "not text"),
    ("jsonl_truncated", "could not be read as json"),
    ("jsonl_lone_surrogate", "could not be read as json"),
    ("json_top_level_list", "ok"),
    ("csv_empty_text", "not text"),
    ("csv_ragged", "could not be read as csv"),
    ("parquet_without_text", "no text column"),
    ("parquet_garbage", "could not be read as parquet"),
    ("symlink_loop", "symbolic link loop"),
    ("dangling_symlink", "broken symbolic link"),
    ("directory", "is a directory"),
]


@pytest.mark.parametrize("case, expected", DATA_CASES, ids=[case for case, _ in DATA_CASES])
def test_mlm_data_file(case, expected, corpus, tokenizer_dir, tmp_path, env, capsys):
    from trainer.mlm import main

    train = make_data_file(case, tmp_path, corpus_lines(corpus))
    validation = [] if case == "one_line" else ["--validation_file", corpus["validation"]]
    out = tmp_path / "out"
    argv = mlm_args(corpus, tokenizer_dir, out, "--max_steps", "1", "--per_device_train_batch_size", "2",
                    "--max_eval_samples", "8", "--max_train_samples", "64", "--peak_tflops", "1")
    argv[argv.index("--train_file") + 1] = train
    del argv[argv.index("--validation_file"):argv.index("--validation_file") + 2]
    check_outcome(main, [*argv, *validation], out, expected, capsys)


# ----------------------------------------------------------------------------------------------- command line
FLAG_CASES = [
    (["--no_such_flag", "1"], "unknown option --no_such_flag"),
    (["--learning", "1e-4"], "did you mean --learning_rate?"),
    (["--max-step", "3"], "did you mean --max-steps?"),
    (["stray"], "unexpected argument 'stray'"),
    (["later.yaml"], "unexpected argument 'later.yaml' (a config file must come first)"),
    (["--max_steps", "three"], "--max_steps: invalid int value: 'three'"),
    (["--learning_rate", ""], "--learning_rate: invalid float value: ''"),
    (["--run_name", " "], "--run_name is empty"),
    (["--report_to", "tensorboard,nope"], "--report_to tensorboard,nope: unknown nope"),
    (["--learning_rate", "nan"], "--learning_rate must be a positive number"),
    (["--learning_rate", "inf"], "--learning_rate must be a positive number"),
    (["--learning_rate", "-1"], "--learning_rate must be a positive number"),
    (["--bf16", "maybe"], "--bf16: Truthy value expected"),
    (["--lr_scheduler_type", "exponential"], "--lr_scheduler_type: invalid choice: 'exponential'"),
    (["--output_dir"], "--output_dir: expected one argument"),
    (["--max_steps", "-5"], "--max_steps must be positive (or -1)"),
    (["--warmup_ratio", "1.5"], "warmup must be non-negative and below 1"),
    (["--validation_split_percentage", "100"], "--validation_split_percentage must be in 1..99"),
    (["--max_seq_length", "100000"], "exceeds the model's 128 positions"),
    (["--seed", "-1"], "--seed must be in 0..4294967295"),
    (["--seed", str(2 ** 40)], "--seed must be in 0..4294967295"),
    (["--adam_beta1", "1.5"], "--adam_beta1 must be in [0, 1)"),
    (["--adam_beta2", "-0.1"], "--adam_beta2 must be in [0, 1)"),
    (["--adam_epsilon", "-1"], "--adam_epsilon must be >= 0"),
    (["--weight_decay", "-0.1"], "--weight_decay must be >= 0"),
    (["--tokenizer_vocab_size", "5"], "--tokenizer_vocab_size must be at least 100"),
    (["--logging_steps", "0"], "--logging_steps must be positive"),
    (["--stop_signals", "SIGKILL"], "--stop_signals: SIGKILL"),
    (["--bf16", "--fp16"], "choose one of --bf16 and --fp16"),
    (["--fp16"], "--fp16 needs a GPU"),
    (["--dataset_name", "some/set"], "either --dataset_name or --train_file"),
    (["--model_name_or_path", "x", "--config_overrides", "a=1"], "--config_overrides only applies"),
    (["--config_overrides", "hidden_size=abc"], "--config_overrides"),
    (["--config_overrides", "no_such_key=1"], "--config_overrides"),
    (["--model_type", "no-such-architecture"], "--model_type no-such-architecture"),
    (["--load_best_model_at_end", "--save_steps", "1", "--metric_for_best_model", "eval_nonsense"],
     "--metric_for_best_model eval_nonsense is not an evaluation metric"),
    (["--text_column", ""], "--text_column '' not in the data"),
    (["--train_file", ""], "--train_file : no such file"),
    (["--output_dir", ""], "--output_dir is empty"),
    (["--resume_from_checkpoint", "/nonexistent/ckpt"], "--resume_from_checkpoint /nonexistent/ckpt: no such"),
    (["--deepspeed", "/nonexistent.json"], "--deepspeed /nonexistent.json: no such file"),
    (["--gradient_checkpointing", "--gradient_checkpointing_kwargs", "{use_reentrant: false}"],
     "--gradient_checkpointing_kwargs is not JSON"),
    (["--optim", "adamw_8bit"], "--optim: invalid choice: 'adamw_8bit'"),
    (["--optim", "sgd", "--deepspeed", os.path.join(REPO_ROOT, "ds_configs", "zero2.json")],
     "ds_configs/zero2.json, which sets an optimizer (DeepSpeed then trains with AdamW)"),
    (["--optim", "adamw_torch_8bit", "--deepspeed", os.path.join(REPO_ROOT, "ds_configs", "zero3_offload.json")],
     "--optim adamw_torch_8bit with"),
    (["--torch_dtype", "float64"], "--torch_dtype: invalid choice: 'float64'"),
    (["--torch_dtype", "bfloat16"], "--torch_dtype bfloat16 trains the weights in bfloat16 without float32 master"),
    (["--torch_dtype", "float16"], "--torch_dtype float16 trains the weights in float16 without float32 master"),
    (["--allow_low_precision_weights", "perhaps"], "--allow_low_precision_weights: Truthy value expected"),
    (["--tf32", "true"], "--tf32 needs a CUDA GPU"),
    (["--tf32", "sometimes"], "--tf32: Truthy value expected"),
    (["--gradient_checkpointing_kwargs", "[1]"], "--gradient_checkpointing_kwargs must be a JSON object"),
    (["--gradient_checkpointing", "--gradient_checkpointing_every", "0"],
     "--gradient_checkpointing_every must be at least 1"),
    (["--gradient_checkpointing_every", "2"], "--gradient_checkpointing_every 2 needs --gradient_checkpointing"),
    (["--gradient_checkpointing_kwargs", '{"reentrant": false}'],
     "--gradient_checkpointing_kwargs: unknown option reentrant"),
]


@pytest.mark.parametrize("flags, expected", FLAG_CASES, ids=[" ".join(f)[:40] for f, _ in FLAG_CASES])
def test_mlm_command_line(flags, expected, corpus, tokenizer_dir, tmp_path, env, capsys):
    from trainer.mlm import main

    out = tmp_path / "out"
    argv = mlm_args(corpus, tokenizer_dir, out, "--max_steps", "1")
    for flag in {f for f in flags if f.startswith("--")} & set(argv):  # the case's value replaces the default one
        del argv[argv.index(flag):argv.index(flag) + 2]
    argv = [a for a in argv if not (a == "bert" and "--model_type" in flags)]
    if "--model_name_or_path" in flags:
        argv = [a for a in argv if a not in TINY_BERT]
    check_outcome(main, [*argv, *flags], out, expected, capsys)


TRAIN_FILES_CASES = [  # the sources of --train_files (CORPUS: the test corpus), then whether --train_file stays
    (["NOWHERE/*.txt"], "matches no file; check the path and the quoting"),
    (["EMPTY_DIR/"], "the directory holds no data file"),
    (["CORPUS:0"], "the weight '0' is not a positive number"),
    (["CORPUS:-1"], "the weight '-1' is not a positive number"),
    (["CORPUS:abc"], "the weight 'abc' is not a positive number"),
    (["CORPUS:nan"], "the weight 'nan' is not a positive number"),
    (["CORPUS:inf"], "the weight 'inf' is not a positive number"),
    (["CORPUS:1", "VALIDATION:0"], "the weight '0' is not a positive number"),
    # A global batch of 8: weight 1 of 101 is 0.08 of a sample.
    (["CORPUS:100", "VALIDATION:1"], "has weight 1 of 101: less than half a sample of a global batch of 8"),
    (["CORPUS", "BODY"], "--train_files BODY has no column 'text' (its columns: id, body); the --train_files BODY "
                         "data needs the training data's columns (text)"),
    (["CORPUS", "CORPUS:2"], "--train_files names CORPUS twice"),
    (["CORPUS", "TRAIN_FILE"], "give either --train_files or --train_file, not both"),
]


@pytest.mark.parametrize("sources, expected", TRAIN_FILES_CASES, ids=[" ".join(s)[:40] for s, _ in TRAIN_FILES_CASES])
def test_mlm_train_files(sources, expected, corpus, tokenizer_dir, tmp_path, env, capsys):
    """--train_files SOURCE ... in place of --train_file (kept where the case names TRAIN_FILE)."""
    from trainer.mlm import main

    (tmp_path / "empty_dir").mkdir()
    places = {"CORPUS": corpus["train"], "VALIDATION": corpus["validation"], "NOWHERE": str(tmp_path / "nowhere"),
              "EMPTY_DIR": str(tmp_path / "empty_dir"),
              "BODY": make_data_file("jsonl_other_name", tmp_path, corpus_lines(corpus))}

    def resolved(text: str) -> str:
        for placeholder, path in places.items():
            text = text.replace(placeholder, path)
        return text

    out = tmp_path / "out"
    argv = mlm_args(corpus, tokenizer_dir, out, "--max_steps", "1", "--per_device_train_batch_size", "8",
                    "--train_files", *(resolved(source) for source in sources if source != "TRAIN_FILE"))
    if "TRAIN_FILE" not in sources:
        argv = argv[2:]  # mlm_args' --train_file
    check_outcome(main, argv, out, resolved(expected), capsys)


PATH_CASES = [
    ("--output_dir", "output_dir_is_file", "--output_dir {path} is a file"),
    ("--output_dir", "output_dir_under_file", "is not a directory"),
    ("--output_dir", "output_dir_symlink_loop", "is not a directory"),
    ("--validation_file", "missing", "--validation_file {path}: no such file"),
    ("--validation_file", "a_dir", "is a directory"),
    ("--tokenizer_name", "empty_dir", "--tokenizer_name {path}: not a tokenizer"),
    ("--tokenizer_name", "missing", "--tokenizer_name {path}: no such directory"),
    ("--tokenizer_name", "a_file", "--tokenizer_name {path} is a file, not a directory"),
    ("--model_name_or_path", "empty_dir", "--model_name_or_path {path}: not a model"),
    ("--config_name", "empty_dir", "--config_name {path}: not a model config"),
    ("--resume_from_checkpoint", "a_dir", "incomplete"),
    ("--deepspeed", "a_file", "--deepspeed {path}"),
]


@pytest.mark.parametrize("flag, kind, expected", PATH_CASES, ids=[f"{f[2:]}-{k}" for f, k, _ in PATH_CASES])
def test_mlm_paths(flag, kind, expected, corpus, tokenizer_dir, tmp_path, env, capsys):
    from trainer.mlm import main

    a_file = tmp_path / "a_file"
    a_file.write_text("precious")
    paths = {"output_dir_is_file": a_file, "output_dir_under_file": a_file / "sub" / "out",
             "output_dir_symlink_loop": tmp_path / "loop", "missing": tmp_path / "missing.txt",
             "a_dir": tmp_path / "a_dir.txt", "empty_dir": tmp_path / "empty_dir", "a_file": a_file}
    os.symlink(tmp_path / "loop", tmp_path / "loop")
    (tmp_path / "a_dir.txt").mkdir()
    (tmp_path / "empty_dir").mkdir()
    path = str(paths[kind])
    out = path if flag == "--output_dir" else str(tmp_path / "out")
    argv = mlm_args(corpus, tokenizer_dir, out, "--max_steps", "1")
    if flag in argv:
        argv[argv.index(flag) + 1] = path
    else:
        argv += [flag, path]
    if flag in ("--model_name_or_path", "--config_name"):
        argv = [a for a in argv if a not in TINY_BERT]
    before = snapshot(out)
    check_outcome(main, argv, out, expected.format(path=path), capsys, before)
    assert a_file.read_text() == "precious"


@pytest.mark.parametrize("where", ["read_only", "proc"])
def test_unwritable_output_dir(where, corpus, tokenizer_dir, tmp_path, env, capsys, read_only_dir):
    """A read-only file system, and /proc, where even root (whom permission bits let through) can make nothing."""
    from trainer.mlm import main

    if where == "proc" and not os.path.isdir("/proc/self"):
        pytest.skip("no /proc file system here")
    out = os.path.join(read_only_dir if where == "read_only" else "/proc", "trainer-out")
    check_outcome(main, mlm_args(corpus, tokenizer_dir, out, "--max_steps", "1"), out, "is not writable", capsys)


@pytest.fixture
def read_only_dir(tmp_path):
    """A directory this process cannot write: chmod for a normal user; for root (CI), a read-only tmpfs."""
    if os.geteuid() != 0:
        directory = tmp_path / "ro"
        directory.mkdir()
        directory.chmod(0o555)
        yield str(directory)
        directory.chmod(0o755)
        return
    with mounted_tmpfs(tmp_path / "ro", "ro,size=1m") as directory:
        yield directory


# --------------------------------------------------------------------------------------------- config files
def test_config_file_with_overrides_and_the_command_line_wins(corpus, tokenizer_dir, tmp_path, env, capsys):
    from trainer.mlm import main

    config = tmp_path / "run.yaml"
    flags = mlm_args(corpus, tokenizer_dir, tmp_path / "from-config", "--max_steps", "50", "--max_train_samples", "16",
                     "--max_eval_samples", "8", "--peak_tflops", "1")
    config.write_text("\n".join(f"{k[2:]}: {json.dumps(v)}" for k, v in zip(flags[::2], flags[1::2])))
    out = tmp_path / "override"
    code, err, _ = run_main(main, [str(config), "--max_steps", "1", "--output_dir", str(out)], capsys)
    assert code == 0, err[-3000:]
    assert json.loads((out / "all_results.json").read_text())["train_steps"] == 1
    assert not (tmp_path / "from-config").exists()


@pytest.mark.parametrize("content, expected", [
    ("learning_rate: [1, 2", "is not valid"),
    ("- a\n- b\n", "must hold a mapping"),
    ("no_such_option: 3\n", "unknown option --no_such_option"),
    ("max_steps: lots\n", "--max_steps: invalid int value: 'lots'"),
    ("", "must hold a mapping"),
])
def test_bad_config_file(content, expected, tmp_path, env, capsys):
    from trainer.mlm import main

    config = tmp_path / "bad.yaml"
    config.write_text(content)
    check_outcome(main, [str(config), "--output_dir", str(tmp_path / "out")], tmp_path / "out", expected, capsys)


def test_demo_config_takes_overrides(corpus):
    """No data named: the demo config, with the command line winning; its overwrite_output_dir stays with its
    own output directory, so an --output_dir given here is protected like any other."""
    from trainer.config.job_config import parse_job_config
    from trainer.engine.optim import OptimizationArguments
    from trainer.mlm import DEMO_CONFIG, MLM_JOB

    def parse(argv):
        return parse_job_config(MLM_JOB.all_sections, argv, DEMO_CONFIG)

    demo, moved = parse([]), parse(["--output_dir", "elsewhere", "--max_steps", "7"])
    assert demo.checkpointing.overwrite_output_dir and demo.checkpointing.output_dir == "output/mlm-demo"
    assert demo.optimization.max_steps > 7
    assert (moved.checkpointing.output_dir, moved.optimization.max_steps,
            moved.checkpointing.overwrite_output_dir) == ("elsewhere", 7, False)
    default_rate = OptimizationArguments.learning_rate
    assert moved.optimization.learning_rate == demo.optimization.learning_rate != default_rate  # the demo's
    with_data = parse(["--train_file", corpus["train"]])
    assert with_data.optimization.learning_rate == default_rate  # data named: no demo config


# ------------------------------------------------------------------------------------------------------ help
@pytest.mark.parametrize("job", ["trainer.mlm", "trainer.classify"])
def test_help(job, capsys):
    import importlib
    import re

    code, _, text = run_main(importlib.import_module(job).main, ["--help"], capsys)
    assert code == 0
    assert text.startswith(f"usage: python -m {job} [CONFIG.yaml|CONFIG.json] [--option VALUE ...]\n")
    flat = " ".join(text.split())
    assert "With no arguments: the offline demo" in flat and "config file given first" in flat
    options = re.findall(r"^  (--\w+)", text, flags=re.M)
    assert len(options) == len(set(options)) > 40 and "--max_steps" in options
    assert not any(option.startswith("--no_") for option in options)
    assert not re.search(r"^  --\w+[ ,].*--", text, flags=re.M)  # one name per option: aliases work, unlisted
    entries = dict(re.findall(r"^  (--\w+)(.*?)(?=^  --|\Z)", text, flags=re.M | re.S))
    assert " ".join(entries["--learning_rate"].split()).endswith("(default: 5e-05)")
    # (a choice list such as {default,reduce-overhead} names a value, not a default)
    # (--adapter_name's default value is the word itself: "(default: default)")
    assert all(re.sub(r"\{[^}]*\}|\(default: default\)", "", " ".join(entry.split())).lower().count("default") <= 1
               for entry in entries.values())
    assert "(default: None)" not in text
    assert "default: the HF_TOKEN" in " ".join(entries["--hub_token"].split())


@dataclass
class WithTrueFlag:
    fused: bool = arg(True, "Use the fused kernel.")


def test_help_folds_the_negated_twin_of_a_true_flag_into_its_entry(capsys):
    from trainer.config.parsing import job_parser

    parser = job_parser((WithTrueFlag,), None)
    parser.print_help()
    text = capsys.readouterr().out
    assert "--no_fused" not in text.replace("(--no_fused turns it off.)", "")
    assert "Use the fused kernel. (--no_fused turns it off.) (default: True)" in " ".join(text.split())
    assert parser.parse_args(["--no_fused"]).fused is False  # still accepted


@pytest.mark.parametrize("content, fused", [("no_fused: true", False), ("no_fused: false", True),
                                            ("fused: false", False), ('{"no-fused": true}', False),
                                            ("no_fused: 3", "no_fused takes true or false, got 3")])
def test_config_file_turns_a_true_flag_off_by_its_negated_twin(content, fused, tmp_path):
    from trainer.config.parsing import parse_arguments
    from trainer.errors import UsageError

    config = tmp_path / ("run.json" if content.startswith("{") else "run.yaml")
    config.write_text(content)
    if isinstance(fused, str):
        with pytest.raises(UsageError, match=fused):
            parse_arguments((WithTrueFlag,), [str(config)])
    else:
        assert parse_arguments((WithTrueFlag,), [str(config)])[0].fused is fused


def test_clm_config_file_with_no_keep_linebreaks(tmp_path):
    from trainer.clm import CLM_JOB
    from trainer.config.job_config import parse_job_config

    config = tmp_path / "run.yaml"
    config.write_text("no_keep_linebreaks: true\nblock_size: 16\n")
    clm_args = parse_job_config(CLM_JOB.all_sections, [str(config)]).clm
    assert (clm_args.keep_linebreaks, clm_args.block_size) == (False, 16)


# ------------------------------------------------------------------------------------------------- classify
def classify_case(case: str, sentiment, directory) -> tuple[list[str], str]:
    """(extra arguments, expected) for trainer.classify; the case's files are written into `directory`."""
    lines = [json.loads(line) for line in open(sentiment["train"])][:40]
    quoted = ("sentence,label\n" + "".join(f'"{r["sentence"]}, ""so"" to say\nreally",{r["label"]}\n' for r in lines))
    cases = {
        "csv_quoting": (["--train_file", write_bytes(directory / "q.csv", quoted.encode())], "ok"),
        "object_text": (["--train_file", write_bytes(directory / "o.jsonl", jsonl(
            {"sentence": {"t": r["sentence"]}, "label": r["label"]} for r in lines)), "--text_column", "sentence"],
            "holds object values, not text"),
        "null_text": (["--train_file", write_bytes(directory / "n.jsonl", jsonl(
            {"sentence": None if i == 3 else r["sentence"], "label": r["label"]} for i, r in enumerate(lines)))],
            "empty or non-text values"),
        "typo": (["--finetune_strategi", "lora"], "did you mean --finetune_strategy?"),
        "predict_without_test_file": (["--do_predict"], "--do_predict needs --test_file"),
        "label_column": (["--label_column", "sentiment"], "no label column 'sentiment'"),
        "strategy_choice": (["--finetune_strategy", "everything"], "--finetune_strategy: invalid choice"),
        "teacher_empty_dir": (["--teacher_model_name_or_path", str(mkdir(directory / "teacher"))],
                              "--teacher_model_name_or_path"),
    }
    return cases[case]


CLASSIFY_CASES = ["csv_quoting", "object_text", "null_text", "typo", "predict_without_test_file", "label_column",
                  "strategy_choice", "teacher_empty_dir"]


@pytest.mark.parametrize("case", CLASSIFY_CASES)
def test_classify_inputs(case, sentiment, tokenizer_dir, tmp_path, env, capsys):
    from trainer.classify import main

    extra, expected = classify_case(case, sentiment, tmp_path)
    out = tmp_path / "out"
    argv = classify_args(sentiment, out, "--max_steps", "1", "--tokenizer_name", tokenizer_dir, *TINY_BERT,
                         "--max_eval_samples", "16", "--peak_tflops", "1")
    if "--train_file" in extra:
        del argv[argv.index("--train_file"):argv.index("--train_file") + 2]
        del argv[argv.index("--validation_file"):argv.index("--validation_file") + 2]
        extra = [*extra, "--validation_file", extra[1]]  # the odd file is both splits
    check_outcome(main, [*argv, *extra], out, expected, capsys)


# ------------------------------------------------------------------------------------------------------ clm
def clm_case(case: str, corpus, directory, gpt2_checkpoint) -> tuple[list[str], str]:  # noqa: F811
    """(extra arguments, expected) for trainer.clm; a data case's file (written into `directory`) is both splits."""
    def data(name):
        return ["--train_file", make_data_file(name, directory, corpus_lines(corpus))]

    a_file = write_bytes(directory / "a_file", b"precious")
    pretrained = ["--model_name_or_path", gpt2_checkpoint]
    cases = {
        # data
        "crlf": (data("crlf"), "ok"),
        "jsonl_other_name": (data("jsonl_other_name"), "ok"),
        "empty": (data("empty"), "is empty"),
        "random_bytes": (data("random_bytes"), "could not be read as text"),
        "jsonl_object_text": (data("jsonl_object_text"), "not text"),
        "whitespace_only": (data("whitespace_only"), "holds no text"),
        "nul_only": (data("nul_only"), "holds no text"),
        "boms_only": (data("boms_only"), "holds no text"),
        "sparse_nul_2gb": (data("sparse_nul_2gb"), "its first line is longer than 64 MiB"),
        "blank_run_then_text": (data("blank_run_then_text"), "ok"),  # a tokenizer batch of blank lines only
        "one_short_line": (["--train_file", write_bytes(directory / "short.txt", b"a short film .\n" * 2)],
                           "too short for one block of 32 tokens"),
        # flags
        "block_size_not_a_number": (["--block_size", "x"], "--block_size: invalid int value: 'x'"),
        "packing_choice": (["--packing", "zigzag"], "--packing: invalid choice: 'zigzag'"),
        "keep_linebreaks_value": (["--keep_linebreaks", "maybe"], "--keep_linebreaks: Truthy value expected"),
        "probe_new_tokens": (["--probe_new_tokens", "0"], "--probe_new_tokens must be positive"),
        "mlm_length_flag": (["--max_seq_length", "64"], "unknown option --max_seq_length"),
        "mlm_flag": (["--mlm_probability", "0.2"], "unknown option --mlm_probability"),
        "not_a_causal_lm": (["--model_type", "t5"], "--model_type t5"),
        "prefix_tuning_with_document_packing": ([*pretrained, "--finetune_strategy", "prefix", "--packing",
                                                 "documents"], "--packing documents restarts position ids"),
        # paths
        "output_dir_is_file": (["--output_dir", a_file], f"--output_dir {a_file} is a file"),
        "validation_file_missing": (["--validation_file", str(directory / "missing.txt")], "no such file"),
        "tokenizer_empty_dir": (["--tokenizer_name", str(mkdir(directory / "empty_tokenizer"))], "not a tokenizer"),
        "model_empty_dir": (["--model_name_or_path", str(mkdir(directory / "empty_model"))], "not a model"),
        # config files
        "config_bad_value": ([write_bytes(directory / "bad.yaml", b"block_size: lots\n")],
                             "--block_size: invalid int value: 'lots'"),
        "config_mlm_key": ([write_bytes(directory / "mlm.yaml", b"line_by_line: true\n")],
                           "unknown option --line_by_line"),
    }
    return cases[case]


CLM_CASES = ["crlf", "jsonl_other_name", "empty", "random_bytes", "jsonl_object_text", "whitespace_only", "nul_only",
             "boms_only", "sparse_nul_2gb", "blank_run_then_text", "one_short_line",
             "block_size_not_a_number", "packing_choice", "keep_linebreaks_value", "probe_new_tokens",
             "mlm_length_flag", "mlm_flag", "not_a_causal_lm", "prefix_tuning_with_document_packing",
             "output_dir_is_file", "validation_file_missing", "tokenizer_empty_dir", "model_empty_dir",
             "config_bad_value", "config_mlm_key"]


@pytest.mark.parametrize("case", CLM_CASES)
def test_clm_inputs(case, corpus, bpe_tokenizer_dir, gpt2_checkpoint, tmp_path, env, capsys):  # noqa: F811
    from trainer.clm import main

    extra, expected = clm_case(case, corpus, tmp_path, gpt2_checkpoint)
    out = extra[extra.index("--output_dir") + 1] if "--output_dir" in extra else str(tmp_path / "out")
    argv = clm_args(corpus, bpe_tokenizer_dir, out, "--max_steps", "1", "--max_eval_samples", "4",
                    "--peak_tflops", "1")
    if "--train_file" in extra:
        del argv[argv.index("--validation_file"):argv.index("--validation_file") + 2]
        extra = [*extra, "--validation_file", extra[1]]
    for flag in {f for f in extra if f.startswith("--")} & set(argv):  # the case's value replaces the default one
        del argv[argv.index(flag):argv.index(flag) + 2]
    if "--model_name_or_path" in extra or "--model_type" in extra:
        argv = [a for a in argv if a not in TINY_GPT2_FLAGS]
    if extra[0].endswith(".yaml"):  # a config file comes first
        argv, extra = [extra[0], *argv], []
    check_outcome(main, [*argv, *extra], out, expected, capsys, snapshot(out))


# --------------------------------------------------------------------------------- prepared data (trainer.prepare)
def damaged_copy(prepared, directory, case: str) -> str:
    """A copy of the `prepared` directory, damaged as `case` says."""
    import shutil

    from trainer.layout import PREPARED_MANIFEST_FILE, prepared_shard_dir

    copy = directory / "prepared"
    shutil.copytree(prepared, copy)
    manifest, shard = copy / PREPARED_MANIFEST_FILE, copy / prepared_shard_dir("train", 0)
    if case == "manifest_truncated":
        manifest.write_bytes(manifest.read_bytes()[:40])
    elif case == "manifest_incomplete":
        manifest.write_text(json.dumps({"format": 1, "job": "mlm"}))
    elif case == "shard_missing":
        shutil.rmtree(shard)
    elif case == "shard_damaged":
        for arrow in shard.glob("*.arrow"):
            arrow.write_bytes(b"not arrow at all" * 64)
    elif case == "shard_count":
        content = json.loads(manifest.read_text())
        content["splits"]["train"]["shards"][0]["sequences"] += 1
        manifest.write_text(json.dumps(content))
    elif case == "manifest_without_labels":
        content = json.loads(manifest.read_text())
        del content["labels"]
        manifest.write_text(json.dumps(content))
    return str(copy)


def from_prepared_data(argv: list[str], data: str, changes: list[str], keep_validation: bool = False) -> list[str]:
    """`argv` training from the prepared directory `data`, with the flags (and values) `changes` replacing theirs."""
    argv = list(argv)
    argv[argv.index("--train_file") + 1] = data
    if not keep_validation:
        del argv[argv.index("--validation_file"):argv.index("--validation_file") + 2]
    for flag in set(changes) & set(argv):
        del argv[argv.index(flag):argv.index(flag) + 2]
    return [*argv, *changes]


PREPARED_CASES = [
    ("tokenizer_mismatch", "is not the tokenizer"),
    ("length_mismatch", "--max_seq_length 64 does not match"),
    ("option_mismatch", "--whole_word_masking True does not match"),
    ("other_job", "was prepared for trainer.mlm, not trainer.clm"),
    ("validation_file_too", "drop --validation_file"),
    ("manifest_truncated", "cannot be read"),
    ("manifest_incomplete", "is incomplete"),
    ("shard_missing", "shard train/shard-00000 named in its manifest is missing"),
    ("shard_damaged", "shard train/shard-00000 cannot be read"),
    ("shard_count", "its manifest says"),
]


@pytest.mark.parametrize("case, expected", PREPARED_CASES, ids=[case for case, _ in PREPARED_CASES])
def test_job_from_prepared_data(case, expected, prepared_mlm, corpus, tokenizer_dir, bpe_tokenizer_dir, tmp_path,
                                env, capsys):  # noqa: F811
    from trainer.clm import main as clm
    from trainer.mlm import main as mlm

    out = tmp_path / "out"
    main, argv = mlm, mlm_args(corpus, tokenizer_dir, out, "--max_steps", "1")
    if case == "other_job":
        main, argv = clm, clm_args(corpus, bpe_tokenizer_dir, out, "--max_steps", "1")
    data = damaged_copy(prepared_mlm, tmp_path, case) if case.startswith(("manifest", "shard")) else prepared_mlm
    changes = {"tokenizer_mismatch": ["--tokenizer_name", bpe_tokenizer_dir], "length_mismatch": ["--max_seq_length",
               "64"], "option_mismatch": ["--whole_word_masking"]}.get(case, [])
    check_outcome(main, from_prepared_data(argv, data, changes, case == "validation_file_too"), out, expected, capsys)


PREPARED_CLASSIFY_CASES = [
    ("tokenizer_mismatch", "is not the tokenizer"),
    ("length_mismatch", "--max_seq_length 32 does not match"),
    ("label_column_mismatch", "--label_column sentence does not match"),
    ("text_column_mismatch", "--text_column label does not match"),
    ("replay_label_not_prepared", "the replay data has labels never seen in training: neutral"),
    ("manifest_without_labels", "its manifest lists no labels"),
    ("mlm_directory", "was prepared for trainer.mlm, not trainer.classify"),
    ("classify_directory_to_mlm", "was prepared for trainer.classify, not trainer.mlm"),
]


@pytest.mark.parametrize("case, expected", PREPARED_CLASSIFY_CASES, ids=[case for case, _ in PREPARED_CLASSIFY_CASES])
def test_classify_from_prepared_data(case, expected, prepared_classify, prepared_mlm, sentiment, corpus, tokenizer_dir,
                                     bpe_tokenizer_dir, tmp_path, env, capsys):  # noqa: F811
    """The directory's labels, tokenizer, length and columns are the run's; a directory for another job is refused
    both ways."""
    from trainer.classify import main as classify
    from trainer.mlm import main as mlm

    out = tmp_path / "out"
    main, argv = classify, classify_args(sentiment, out, "--max_steps", "1", *TINY_BERT, "--max_eval_samples", "16",
                                         "--peak_tflops", "1")
    if case == "classify_directory_to_mlm":
        main, argv = mlm, mlm_args(corpus, tokenizer_dir, out, "--max_steps", "1")
    data = prepared_mlm if case == "mlm_directory" else prepared_classify
    if case == "manifest_without_labels":
        data = damaged_copy(prepared_classify, tmp_path, case)
    replay = write_bytes(tmp_path / "old.jsonl", jsonl([{"sentence": "a film .", "label": "neutral"}]))
    changes = {"tokenizer_mismatch": ["--tokenizer_name", bpe_tokenizer_dir], "length_mismatch": ["--max_seq_length",
               "32"], "label_column_mismatch": ["--label_column", "sentence"], "text_column_mismatch": [
               "--text_column", "label"], "replay_label_not_prepared": ["--replay_file", replay, "--replay_ratio",
                                                                        "0.25"]}.get(case, [])
    check_outcome(main, from_prepared_data(argv, data, changes), out, expected, capsys)


PREPARE_CASES = [
    ("no_job", "--job is required"),
    ("unknown_job", "--job: invalid choice: 'translate'"),
    ("no_data", "name the text to prepare with --train_file or --dataset_name"),
    ("output_dir_not_empty", "is not empty; pass --overwrite_output_dir"),
    ("max_train_samples", "--max_train_samples applies when training"),
    ("already_prepared", "is already prepared"),
    ("text_too_short", "too short for one sequence of 32 tokens"),
    ("mlm_flag_for_clm", "unknown option --max_seq_length"),
    ("classify_label_column", "the training data has no label column 'rating'"),
]


@pytest.mark.parametrize("case, expected", PREPARE_CASES, ids=[case for case, _ in PREPARE_CASES])
def test_prepare_inputs(case, expected, prepared_mlm, corpus, sentiment, tokenizer_dir, tmp_path, env,
                        capsys):  # noqa: F811
    from trainer.layout import TEMPORARY_SUFFIX
    from trainer.prepare import main

    out = tmp_path / "prepared"
    argv = prepare_args(corpus, tokenizer_dir, out)
    if case == "output_dir_not_empty":
        out.mkdir()
        (out / "notes.txt").write_text("precious")
    edits = {"no_job": lambda: argv[2:], "unknown_job": lambda: ["--job", "translate", *argv[2:]],
             "no_data": lambda: [a for a in argv if a not in ("--train_file", corpus["train"])],
             "max_train_samples": lambda: [*argv, "--max_train_samples", "10"],
             "already_prepared": lambda: [a if a != corpus["train"] else prepared_mlm for a in argv],
             "text_too_short": lambda: [a if a not in corpus.values() else
                                        write_bytes(tmp_path / "short.txt", b"a film .\n" * 3) for a in argv],
             "mlm_flag_for_clm": lambda: ["--job", "clm", *argv[2:]],
             "classify_label_column": lambda: prepare_args(sentiment, tokenizer_dir, out, "classify", "--label_column",
                                                           "rating")}
    check_outcome(main, edits.get(case, lambda: argv)(), out, expected, capsys, snapshot(out))
    assert not os.path.exists(f"{out}{TEMPORARY_SUFFIX}")


# ----------------------------------------------------------------------------------------- real processes
def write_object_text(tmp_path) -> str:
    return write_bytes(tmp_path / "object.jsonl", jsonl({"text": {"en": "a film"}} for _ in range(50)))


@pytest.mark.parametrize("case", ["unknown_flag", "object_text"])
def test_process_exits_2_with_one_line(case, corpus, tokenizer_dir, tmp_path, job_env):
    out = tmp_path / "out"
    args = mlm_args(corpus, tokenizer_dir, out, "--max_steps", "1")
    if case == "unknown_flag":
        args += ["--max_stepz", "3"]
    else:
        args[args.index("--train_file") + 1] = write_object_text(tmp_path)
    result = run_job("trainer.mlm", args, job_env, check=False, timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stdout + result.stderr
    expected = {"unknown_flag": "error: unknown option --max_stepz; did you mean --max_steps?",
                "object_text": "error: column 'text' of --train_file "}[case]
    assert result.stderr.strip().splitlines()[-1].startswith(expected), result.stderr
    assert not out.exists()


@pytest.mark.slow
@pytest.mark.parametrize("case", ["bad_argument", "bad_data"])
def test_torchrun_every_rank_exits_2_and_none_hangs(case, corpus, tokenizer_dir, tmp_path, job_env):
    """Bad data fails on rank 0 inside the rank-0-first data preparation, while rank 1 waits for it; a bad
    argument fails on every rank before any process group exists. Each rank's stderr is the one error line."""
    out, logs = tmp_path / "out", tmp_path / "logs"
    args = mlm_args(corpus, tokenizer_dir, out, "--max_steps", "1")
    if case == "bad_argument":
        args += ["--warmup_ratio", "2"]
    else:
        args[args.index("--train_file") + 1] = write_object_text(tmp_path)
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                str(free_port()), "--log-dir", str(logs), "--redirects", "3"]
    result = run_job("trainer.mlm", args, job_env, check=False, timeout=180, launcher=launcher)
    assert result.returncode != 0 and result.stderr.count("exitcode  : 2") == 2, result.stderr
    rank_errors = sorted(glob.glob(str(logs / "*" / "attempt_0" / "*" / "stderr.log")))
    assert len(rank_errors) == 2
    lines = [open(path).read().strip().splitlines() for path in rank_errors]
    assert lines[0] == lines[1] and len(lines[0]) == 1 and lines[0][0].startswith("error: "), lines
    assert ("warmup must be" if case == "bad_argument" else "holds object values, not text") in lines[0][0]
    assert not out.exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their permissions")
def test_unreadable_training_file(corpus, tokenizer_dir, tmp_path, env, capsys):
    from trainer.mlm import main

    locked = tmp_path / "locked.txt"
    locked.write_text("some text\n" * 50)
    locked.chmod(0)
    argv = mlm_args(corpus, tokenizer_dir, tmp_path / "out", "--max_steps", "1")
    argv[argv.index("--train_file") + 1] = str(locked)
    check_outcome(main, argv, tmp_path / "out", "is not readable", capsys)


# ------------------------------------------------------------------------------------------------ --streaming
def streaming_shards(corpus, directory, second_column: str = "text", corrupt: bool = False) -> str:
    """Two .jsonl shards of the corpus's lines; the second's text under `second_column`, optionally with a line cut
    off mid-object."""
    lines = corpus_lines(corpus, 400)
    shards = directory / "shards"
    shards.mkdir()
    write_bytes(shards / "a.jsonl", jsonl({"text": line} for line in lines[0::2]))
    second = jsonl({second_column: line} for line in lines[1::2]).splitlines(keepends=True)
    if corrupt:  # a quarter in: inside some lane's part, whichever order a pass lays the shards out in
        second.insert(len(second) // 4, b'{"text": "cut off\n')
    write_bytes(shards / "b.jsonl", b"".join(second))
    return str(shards)


def streaming_case(case: str, corpus, directory) -> tuple[list[str], str]:
    """(flags added to mlm_args with the training data replaced, expected)."""
    shards = streaming_shards(corpus, directory, "body" if case.endswith("without_text_column") else "text")
    stream = ["--streaming", "--train_file", shards]
    mixture = ["--streaming", "--train_files", os.path.join(shards, "a.jsonl:3"), os.path.join(shards, "b.jsonl:1"),
               "--max_steps", "2"]
    cases = {
        "directory": ([*stream, "--max_steps", "2"], "ok"),
        "glob_line_by_line": (["--streaming", "--train_file", os.path.join(shards, "*.jsonl"), "--line_by_line",
                               "--max_steps", "2"], "ok"),
        "no_max_steps": (stream, "--streaming needs --max_steps"),
        "empty_glob": (["--streaming", "--train_file", str(directory / "none-*.jsonl"), "--max_steps", "2"],
                       "the pattern matches no file"),
        "shard_without_text_column": ([*stream, "--max_steps", "2"], "b.jsonl has no column 'text'"),
        "max_train_samples": ([*stream, "--max_steps", "2", "--max_train_samples", "8"],
                              "--max_train_samples does not apply to --streaming"),
        "directory_without_streaming": (["--train_file", shards, "--max_steps", "2"], "is a directory"),
        "mixture": (mixture, "ok"),
        "replay": ([*stream, "--max_steps", "2", "--replay_file", os.path.join(shards, "b.jsonl"), "--replay_ratio",
                    "0.5"], "ok"),
        "mixture_source_without_text_column": (mixture, "b.jsonl has no column 'text'"),
        "replay_too_small_for_its_lanes": ([*stream, "--max_steps", "2", "--replay_file", write_bytes(
            directory / "one.jsonl", jsonl([{"text": "the one line"}])), "--replay_ratio", "0.5",
            "--per_device_train_batch_size", "8"], "lane 1 of its 4 (its share of every global batch) finds no text"),
        "hub_dataset_offline": (["--streaming", "--dataset_name", "someone/some-dataset", "--max_steps", "2"],
                                "--dataset_name someone/some-dataset: no such local directory, and the Hugging Face "
                                "Hub cannot be reached to download this dataset; pass a local directory or run with "
                                "network access"),
        "missing_url": (["--streaming", "--train_file", "memory://no-such-bucket/train.jsonl", "--max_steps", "2"],
                        "--train_file memory://no-such-bucket/train.jsonl: no such file"),
        "unknown_protocol": (["--streaming", "--train_file", "nosuch://bucket/train.jsonl", "--max_steps", "2"],
                             "--train_file nosuch://bucket/train.jsonl could not be read: ValueError: Protocol not "
                             "known: nosuch"),
        "url_without_streaming": (["--train_file", "memory://bucket/train.jsonl", "--max_steps", "2"],
                                  "--train_file memory://bucket/train.jsonl is a URL, which only --streaming reads"),
    }
    return cases[case]


STREAMING_CASES = ["directory", "glob_line_by_line", "no_max_steps", "empty_glob", "shard_without_text_column",
                   "max_train_samples", "directory_without_streaming", "mixture", "replay",
                   "mixture_source_without_text_column", "replay_too_small_for_its_lanes", "hub_dataset_offline",
                   "missing_url", "unknown_protocol", "url_without_streaming"]


@pytest.fixture
def hub_offline(monkeypatch):
    """The Hub unreachable, whatever this process saw before: huggingface_hub reads HF_HUB_OFFLINE when it is
    first imported, and trainer.hub.reachability caches its answer."""
    from huggingface_hub import constants

    from trainer.hub.reachability import hub_is_reachable

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    hub_is_reachable.cache_clear()
    yield
    hub_is_reachable.cache_clear()


@pytest.mark.parametrize("case", STREAMING_CASES)
def test_mlm_streaming_inputs(case, corpus, tokenizer_dir, tmp_path, env, hub_offline, capsys):
    from trainer.mlm import main

    extra, expected = streaming_case(case, corpus, tmp_path)
    out = tmp_path / "out"
    argv = mlm_args(corpus, tokenizer_dir, out, "--per_device_train_batch_size", "2", "--max_eval_samples", "4",
                    "--peak_tflops", "1")
    del argv[argv.index("--train_file"):argv.index("--train_file") + 2]
    check_outcome(main, [*argv, *extra], out, expected, capsys)


@pytest.mark.parametrize("drop, expected", [("--validation_file", "give --validation_file"),
                                             ("--tokenizer_name", "--streaming trains no tokenizer")])
def test_mlm_streaming_needs_validation_data_and_a_tokenizer(drop, expected, corpus, tokenizer_dir, tmp_path, env,
                                                             capsys):
    from trainer.mlm import main

    out = tmp_path / "out"
    argv = mlm_args(corpus, tokenizer_dir, out, "--streaming", "--max_steps", "2")
    del argv[argv.index(drop):argv.index(drop) + 2]
    check_outcome(main, argv, out, expected, capsys)


def test_clm_streams_a_glob_with_document_packing(corpus, bpe_tokenizer_dir, tmp_path, env, capsys):  # noqa: F811
    from trainer.clm import main

    out = tmp_path / "out"
    argv = clm_args(corpus, bpe_tokenizer_dir, out, "--streaming", "--max_steps", "2", "--max_eval_samples", "4",
                    "--packing", "documents", "--peak_tflops", "1")
    argv[argv.index("--train_file") + 1] = os.path.join(streaming_shards(corpus, tmp_path), "*.jsonl")
    check_outcome(main, argv, out, "ok", capsys)


def test_classify_refuses_streaming(sentiment, tmp_path, env, capsys):  # noqa: F811
    from trainer.classify import main

    out = tmp_path / "out"
    check_outcome(main, [*classify_args(sentiment, out), "--streaming", "--max_steps", "1"], out,
                  "--streaming is for trainer.mlm and trainer.clm", capsys)


@pytest.mark.parametrize("case, expected", [
    ("ends", r"ended after 1 pass\(es\) \(--num_train_epochs\) before --max_steps.*The last good checkpoint is none"),
    ("corrupt", r"b\.jsonl \(byte \d+\) could not be read: JSONDecodeError.*The last good checkpoint is "
                r"checkpoint-\d+ in"),
])
def test_a_stream_that_fails_mid_run_stops_with_one_line_and_no_model(case, expected, corpus, tokenizer_dir,
                                                                      tmp_path, env, capsys):
    """Found during training: one line naming the problem and the last good checkpoint, exit code 2, no final
    model; the data is never skipped."""
    import re

    from trainer.mlm import main

    out = tmp_path / "out"
    shards = streaming_shards(corpus, tmp_path, corrupt=case == "corrupt")
    # 8 lanes run out sooner; the cut-off line, a quarter into its shard, lies 1/4 into one of 2 lanes' parts
    # (some 20 steps in, after a checkpoint).
    flags = (["--num_train_epochs", "1", "--per_device_train_batch_size", "8"] if case == "ends" else
             ["--num_train_epochs", "3", "--save_steps", "8", "--shuffle_buffer_size", "10",
              "--per_device_train_batch_size", "2"])
    argv = mlm_args(corpus, tokenizer_dir, out, "--streaming", "--max_steps", "100000", "--max_eval_samples", "4",
                    "--logging_steps", "1000", "--peak_tflops", "1", *flags)
    argv[argv.index("--train_file") + 1] = shards
    code, err, _ = run_main(main, argv, capsys)
    assert code == 2, err[-3000:]
    assert re.search(expected, error_line(err)), error_line(err)
    assert not os.path.exists(out / "model.safetensors")


def test_mlm_streams_a_local_dataset_directory_by_its_splits(corpus, tokenizer_dir, tmp_path, env, capsys):
    """--dataset_name DIR --streaming: the train and validation files as datasets names the splits."""
    from trainer.mlm import main

    dataset = tmp_path / "dataset"
    dataset.mkdir()
    lines = corpus_lines(corpus, 300)
    for shard in range(2):
        write_bytes(dataset / f"train-{shard}.jsonl", jsonl({"text": line} for line in lines[shard:200:2]))
    write_bytes(dataset / "validation.jsonl", jsonl({"text": line} for line in lines[200:]))
    out = tmp_path / "out"
    argv = mlm_args(corpus, tokenizer_dir, out, "--streaming", "--max_steps", "2", "--max_eval_samples", "4",
                    "--per_device_train_batch_size", "2", "--peak_tflops", "1", "--dataset_name", str(dataset))
    for flag in ("--train_file", "--validation_file"):
        del argv[argv.index(flag):argv.index(flag) + 2]
    check_outcome(main, argv, out, "ok", capsys)
