"""One output layout: every name inside the output and checkpoint directories is spelled in trainer/layout.py
alone, in the package and in the Slurm scripts, which read the names from `python -m trainer.layout`."""
from __future__ import annotations

import ast
import glob
import os
import re
import subprocess
import sys

from conftest import REPO_ROOT
from trainer import layout

# Also the name of a file in any Hugging Face Hub repository (a dataset's card): not ours alone.
SHARED_WITH_THE_HUB = {layout.MODEL_CARD_FILE}


def layout_names() -> set[str]:
    """The names layout.py defines; a name with a number in it (checkpoint-<step>, rank-<r>.pt) with `{}` there,
    as an f-string's text reads below."""
    names = {value for name, value in vars(layout).items() if name.isupper() and isinstance(value, str)}
    return names | {layout.checkpoint_name("{}"), layout.rank_state_file("{}")}


def distinctive(name: str) -> bool:
    """A name that cannot be part of something else (optimizer.pt, checkpoint_complete; not runs, fsdp, .tmp):
    found inside any text, where the others are found as a whole string."""
    return len(name) >= 6 and bool(re.search(r"[._-]", name))


def spelled_names(text: str, names: set[str]) -> set[str]:
    """The layout names a piece of text spells: all of it, or a distinctive name inside it."""
    return {name for name in names if text == name or (distinctive(name) and name in text)}


def code_texts(source: str) -> list[tuple[int, str]]:
    """(line, text) of every string in Python code, docstrings left out; an f-string with `{}` for each value."""
    tree = ast.parse(source)
    docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                  if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                  and node.body and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)}
    inside_fstrings = {id(part) for node in ast.walk(tree) if isinstance(node, ast.JoinedStr) for part in node.values}
    texts = []
    for node in ast.walk(tree):
        if isinstance(node, ast.JoinedStr):
            texts.append((node.lineno, "".join(part.value if isinstance(part, ast.Constant) else "{}"
                                               for part in node.values)))
        elif (isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings
              and id(node) not in inside_fstrings):
            texts.append((node.lineno, node.value))
    return texts


def shell_code(source: str) -> list[tuple[int, str]]:
    """(line, text) of a shell script without its comments."""
    return [(number, re.sub(r"(^|\s)#.*", "", line)) for number, line in enumerate(source.splitlines(), 1)]


def spellings_outside_layout() -> list[str]:
    names = layout_names()
    found = []
    for path in sorted(glob.glob(os.path.join(REPO_ROOT, "trainer", "**", "*.py"), recursive=True)):
        if os.path.samefile(path, layout.__file__):
            continue
        for line, text in code_texts(open(path).read()):
            found += [f"{os.path.relpath(path, REPO_ROOT)}:{line}: {name}"
                      for name in spelled_names(text, names - SHARED_WITH_THE_HUB)]
    for path in sorted(glob.glob(os.path.join(REPO_ROOT, "slurm", "*.s*"))):  # common.sh, *.sbatch
        for line, text in shell_code(open(path).read()):
            found += [f"{os.path.relpath(path, REPO_ROOT)}:{line}: {name}"
                      for name in spelled_names(text, names) if distinctive(name) and name in text]
    return found


def test_every_output_name_is_spelled_in_layout_alone():
    assert layout.RESULTS_FILE in layout_names() and "rank-{}.pt" in layout_names()
    found = spellings_outside_layout()
    assert not found, "spelled outside trainer/layout.py: " + "; ".join(found)


def test_the_scan_finds_names_in_code_and_fstrings_but_not_in_docstrings_or_comments():
    names = layout_names()
    source = ('"""Writes optimizer.pt."""\n'
              'import os\n'
              'def save(directory, rank):\n'
              '    """Into trainer_state.json."""\n'
              '    os.path.join(directory, "optimizer.pt")  # and scheduler.pt\n'
              '    return os.path.join(directory, f"rank-{rank}.pt"), f"{directory}/runs", "runs"\n')
    spelled = {(line, name) for line, text in code_texts(source) for name in spelled_names(text, names)}
    assert spelled == {(5, "optimizer.pt"), (6, "rank-{}.pt"), (6, "runs")}
    shell = 'ls "$dir"/checkpoint-*/checkpoint_complete  # all_results.json\n# log_history.jsonl\n'
    assert {name for _, text in shell_code(shell) for name in spelled_names(text, names)} == {
        "checkpoint-", "checkpoint_complete"}


def test_the_shell_gets_every_name_from_python():
    """slurm/common.sh evaluates `python -m trainer.layout`: the variables hold the module's values, quoting
    included (a glob pattern stays a pattern)."""
    script = 'eval "$("$0" -m trainer.layout)"; printf "%s\\n" "$TRAINER_LAYOUT_PREFIX" ' \
             '"$TRAINER_LAYOUT_COMPLETE_MARKER" "$TRAINER_LAYOUT_RESULTS_FILE" "$TRAINER_LAYOUT_TORCH_STATE_FILES"'
    result = subprocess.run(["bash", "-c", script, sys.executable], cwd=REPO_ROOT, capture_output=True, text=True,
                            check=True)
    assert result.stdout.splitlines() == [layout.PREFIX, layout.COMPLETE_MARKER, layout.RESULTS_FILE,
                                          layout.TORCH_STATE_FILES]
    common = open(os.path.join(REPO_ROOT, "slurm", "common.sh")).read()
    assert "-m trainer.layout" in common and "$TRAINER_LAYOUT_COMPLETE_MARKER" in common
