"""The command-line machinery every job shares: HfArgumentParser with one-line errors, config files plus
overrides, the --help formatter, did-you-mean for unknown options, and the `arg()` field helper.
"""
from __future__ import annotations

import argparse
import difflib
import os
import re
import shlex
import sys
from dataclasses import field

from trainer.errors import UsageError, require


def arg(default, help: str, **kwargs):
    """A dataclass field whose help text shows in `--help`."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help, **kwargs})
    return field(default=default, metadata={"help": help, **kwargs})


CONFIG_EXTENSIONS = (".yaml", ".yml", ".json")


def parse_arguments(dataclass_types, argv: list[str] | None = None, default_config: str | None = None):
    """Parse the command line into the given dataclasses; every mistake is a one-line UsageError.

    A `.yaml`/`.yml`/`.json` first argument is a config file; the flags after it override its values. Without a
    config file and without data (--train_file, --train_files, --dataset_name), the packaged `default_config` (the
    job's embedded offline demo) is the config file the flags override: `python -m trainer.mlm --output_dir
    elsewhere` reruns the demo into `elsewhere`.
    """
    parser = job_parser(dataclass_types, default_config)
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0].endswith(CONFIG_EXTENSIONS):
        argv = config_file_as_argv(argv[0], parser) + argv[1:]
    elif default_config and not names_data(argv) and "-h" not in argv and "--help" not in argv:
        argv = demo_config_as_argv(default_config, argv, parser) + argv
    _, unknown = parser.parse_known_args(argv)  # unknown flags first: a typo must not surface as another error
    if unknown:
        raise UsageError(unknown_arguments_message(parser, unknown))
    return parser.parse_args_into_dataclasses(argv)


def names_data(argv: list[str]) -> bool:
    return any(names_flag(argv, flag) for flag in ("train_file", "train_files", "dataset_name"))


def names_flag(argv: list[str], flag: str) -> bool:
    return any(a.split("=")[0] in (f"--{flag}", f"--{flag.replace('_', '-')}") for a in argv)


def demo_config_as_argv(path: str, overrides: list[str], parser) -> list[str]:
    """The demo config as flags. Its `overwrite_output_dir` is meant for its own output directory only: an
    --output_dir given on the command line is protected like any other (a non-empty one is refused)."""
    argv = config_file_as_argv(path, parser)
    if names_flag(overrides, "output_dir") and "--overwrite_output_dir" in argv:
        index = argv.index("--overwrite_output_dir")
        del argv[index:index + 2]
    return argv


def unknown_arguments_message(parser, unknown: list[str]) -> str:
    first = unknown[0]
    if not first.startswith("-"):
        where = ("a config file must come first" if first.endswith(CONFIG_EXTENSIONS)
                 else "values follow their --flag")
        return f"unexpected argument '{first}' ({where}); see {parser.prog} --help"
    flag = first.split("=")[0]
    known = [option for action in parser._actions for option in action.option_strings]
    close = difflib.get_close_matches(flag, known, n=1)
    hint = f"did you mean {close[0]}? " if close else ""
    return f"unknown option {flag}; {hint}see {parser.prog} --help for the options"


def job_parser(dataclass_types, default_config: str | None):
    """HfArgumentParser for a job: `python -m <job>` in the usage line, what no arguments and a config file
    do, each option listed once with its default once, and argparse's errors as one-line UsageErrors."""
    from transformers import HfArgumentParser

    class Parser(HfArgumentParser):
        def error(self, message):  # argparse prints the whole usage and exits 2; we want one line
            message = re.sub(r"^argument (--\w+)(?:/--[\w-]+)*:", r"\1:", message).rstrip(". ")
            raise UsageError(f"{message}; see {self.prog} --help")

    prog = f"python -m {job_module(dataclass_types)}"
    package_root = os.path.dirname(os.path.dirname(os.path.dirname(__file__)))
    demo = (f"With no arguments: the offline demo, {os.path.relpath(default_config, package_root)}. "
            if default_config else "")
    over_demo = ("With no config file and no --train_file, --train_files or --dataset_name, options override the demo config "
                 "(e.g. --output_dir elsewhere). " if default_config else "")
    parser = Parser(dataclass_types, prog=prog, usage=f"{prog} [CONFIG.yaml|CONFIG.json] [--option VALUE ...]",
                    description=f"{demo}A .yaml/.yml/.json config file given first sets options by name; options "
                                f"after it override it. {over_demo}Bad input ends with one 'error: ...' line and "
                                f"exit code 2.",
                    formatter_class=HelpFormatter, allow_abbrev=False)
    hide_negated_twins(parser)
    return parser


def job_module(dataclass_types) -> str:
    """The job's module name (e.g. trainer.mlm): its own arguments dataclass comes last and lives there."""
    module = dataclass_types[-1].__module__
    if module == "__main__":  # run as `python -m trainer.mlm`
        spec = getattr(sys.modules["__main__"], "__spec__", None)
        module = spec.name if spec is not None else os.path.splitext(os.path.basename(sys.argv[0]))[0]
    return module


def hide_negated_twins(parser) -> None:
    """HfArgumentParser adds `--no_<flag>` for a bool defaulting to True: list it in its flag's help only."""
    by_dest = {action.dest: action for action in parser._actions if action.option_strings[:1] == [f"--{action.dest}"]}
    for action in parser._actions:
        main = by_dest.get(action.dest)
        if main is not None and action is not main:
            main.help = f"{main.help} ({action.option_strings[0]} turns it off.)"
            action.help = argparse.SUPPRESS


class HelpFormatter(argparse.HelpFormatter):
    """One name per option (the dashed aliases still work) and its default once: appended unless the help
    text already says what happens by default or when unset."""

    def _format_action_invocation(self, action):
        if not action.option_strings or action.dest == "help":
            return super()._format_action_invocation(action)
        if action.nargs == 0:
            return action.option_strings[0]
        return f"{action.option_strings[0]} {self._format_args(action, self._get_default_metavar_for_optional(action))}"

    def _get_help_string(self, action):
        text = action.help or ""
        if action.default in (None, argparse.SUPPRESS, []) or "default" in text.lower() or "unset" in text.lower():
            return text
        default = (" ".join(shlex.quote(str(v)) for v in action.default) if isinstance(action.default, list)
                   else str(action.default))
        return f"{text} (default: {default.replace('%', '%%')})"


def config_file_as_argv(path: str, parser) -> list[str]:
    """A config file's keys as command-line flags, so argparse converts and checks them exactly as it does flags
    (HfArgumentParser.parse_yaml_file would pass YAML strings such as '5e-5' through unconverted). A flag that
    takes no value (the `--no_<flag>` twin of a bool defaulting to True) stands bare when its key is true and
    is left out when false."""
    import json

    import yaml

    require(os.path.isfile(path), f"config file {path} not found")
    try:
        with open(path) as handle:
            config = json.load(handle) if path.endswith(".json") else yaml.safe_load(handle)
    except (ValueError, yaml.YAMLError) as error:
        raise UsageError(f"config file {path} is not valid: {str(error).splitlines()[0]}") from None
    require(isinstance(config, dict), f"config file {path} must hold a mapping of argument names to values")
    takes_no_value = {option for action in parser._actions if action.nargs == 0 for option in action.option_strings}
    argv = []
    for key, value in config.items():
        if value is None:
            continue
        if f"--{key}" in takes_no_value:
            require(isinstance(value, bool), f"config file {path}: {key} takes true or false, got {value!r}")
            argv += [f"--{key}"] if value else []
            continue
        values = value if isinstance(value, list) else [value]
        argv += [f"--{key}", *(str(v) for v in values)]
    return argv
