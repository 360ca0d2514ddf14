"""The config checked as a whole: every problem at once, one short line each, before any job.

Snakemake's own `validate` stops at the first problem and, for an unknown key, prints the whole
schema; a user with three typos would fix them one run at a time.
"""

from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Any, Mapping

import jsonschema
import yaml


class ConfigError(ValueError):
    def __init__(self, problems: list[str]):
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"config: {len(problems)} problem(s); nothing was run:\n{lines}")


def _where(error: jsonschema.ValidationError) -> str:
    return ".".join(str(part) for part in error.absolute_path)


def _key_paths(schema: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """{key: its dotted path} for every named key of the schema, at any depth."""
    paths = {}
    for key, sub in (schema.get("properties") or {}).items():
        paths.setdefault(key, prefix + key)
        paths.update({k: v for k, v in _key_paths(sub, f"{prefix}{key}.").items() if k not in paths})
    return paths


def _message(error: jsonschema.ValidationError, root: Mapping[str, Any]) -> list[str]:
    where = _where(error)
    if error.validator == "additionalProperties":
        known = sorted((error.schema.get("properties") or {}).keys())
        patterns = error.schema.get("patternProperties") or {}
        if patterns:
            known += [p.strip("^$()").replace("|", ", ") for p in patterns]
        out = []
        for key in sorted(set(error.instance) - set(error.schema.get("properties") or {})):
            if any(re.match(p, key) for p in patterns):
                continue
            close = difflib.get_close_matches(key, known, n=1)
            anywhere = _key_paths(root)
            elsewhere = difflib.get_close_matches(key, list(anywhere), n=1)
            if close:
                hint = f" (did you mean {close[0]!r}?)"
            elif elsewhere:
                hint = f" (did you mean {anywhere[elsewhere[0]]!r}?)"
            else:
                hint = f" (known here: {', '.join(known)})"
            out.append(f"{where + '.' if where else ''}{key}: unknown key{hint}")
        return out
    if error.validator == "required":
        return [f"{where or 'config'}: {error.message}"]
    if error.validator in ("oneOf", "anyOf"):
        return [f"{where}: {error.instance!r} is not allowed here ({error.schema.get('description', 'see config/README.md')})"]
    return [f"{where or 'config'}: {error.message}"]


def check_config(config: Mapping[str, Any], schema_path: str | Path) -> None:
    """Every problem of `config` against its schema, and those the schema cannot express (the
    defaults' frame count and size pairs), raised together as one ConfigError."""
    from .sheet import SheetError, check_defaults

    schema = yaml.safe_load(Path(schema_path).read_text())
    problems = []
    for error in sorted(jsonschema.Draft202012Validator(schema).iter_errors(config), key=lambda e: list(e.absolute_path)):
        problems += _message(error, schema)
    defaults = config.get("defaults")
    if isinstance(defaults, Mapping):
        try:
            check_defaults(defaults)
        except SheetError as err:
            problems += [p for p in err.problems if p not in problems]
    if problems:
        raise ConfigError(problems)
