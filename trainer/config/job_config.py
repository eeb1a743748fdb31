"""A job's parsed command line as named sections: `config.optimization.learning_rate`,
`config.checkpointing.output_dir`.

Each section is a dataclass defined beside the component that uses it (trainer/models/arguments.py,
trainer/data/arguments.py, ...); a component is handed its own section(s), never the whole configuration. The
sections are parsed exactly as before the split: one flat command line, the same flags and config-file keys.
"""
from __future__ import annotations

import dataclasses
import re

from trainer.config.parsing import parse_arguments

# A name part (between underscores) that says secret: hub_token, api_key, ..., not tokenizer_name or loss_chunk_tokens.
SECRET_FIELD = re.compile(r"(?:^|_)(?:token|key|secret|password)(?:$|_)")


class JobConfig:
    """The parsed sections by name, in command-line order (the job's own section last)."""

    def __init__(self, sections: dict[str, object]):
        self.sections = dict(sections)
        vars(self).update(sections)

    def get(self, name: str):
        """The section `name`, or None when this job has none (e.g. `finetune` in mlm)."""
        return self.sections.get(name)

    def as_dict(self) -> dict:
        """Every argument as one flat dict (for logs, trainer_state.json, model cards and trackers), with every secret
        (a field whose name has a part token, key, secret or password) redacted."""
        merged = {}
        for section in self.sections.values():
            merged.update(dataclasses.asdict(section))
        return {key: "<redacted>" if SECRET_FIELD.search(key) and value else value for key, value in merged.items()}


def parse_job_config(sections: dict[str, type], argv: list[str] | None = None,
                     default_config: str | None = None) -> JobConfig:
    """`parse_arguments` into the named section dataclasses."""
    return JobConfig(dict(zip(sections, parse_arguments(tuple(sections.values()), argv, default_config))))
