"""The config checked as a whole: every problem at once, one short line each, before any job.

Snakemake's own `validate` stops at the first problem and, for an unknown key, prints the whole
schema; a user with three typos would fix them one run at a time. `check_config` lists them all,
each naming its key path (`defaults.num_steps: 5 is greater than the maximum of 4`), and fills in
the schema's defaults as `validate(config, schema)` did.

`merge_config` is the config as Snakemake builds it from `configfile: "config/config.yaml"` and a
user's `--configfile my.yaml`: the user's keys over the workflow's, dict by dict.
"""

from __future__ import annotations

import copy
import difflib
import re
from pathlib import Path
from typing import Any, Mapping, MutableMapping

import jsonschema
import yaml


class ConfigError(ValueError):
    """All problems of the config, one per line (`problems`)."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"config: {len(problems)} problem(s); nothing was run:\n{lines}")


def load_configfile(path: str | Path) -> dict:
    """A YAML config file as a dict ({} for an empty file); ConfigError if it cannot be read."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError([f"{path}: the config file does not exist"]) from None
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError([f"{path}: cannot be read ({err})"]) from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        at = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        reason = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError([f"{path}: not valid YAML{at}: {reason}"]) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError([f"{path}: holds a {type(data).__name__}, not keys with values (key: value lines)"])
    return data


def merge_config(user: Mapping[str, Any] | None, default_path: str | Path) -> dict:
    """The config at `default_path` (config/config.yaml) with `user` merged over it as Snakemake
    merges a --configfile over the workflow's `configfile:`: a dict value merges key by key into the
    default's dict, any other value replaces the default's. Neither argument is changed."""
    return _merge(load_configfile(default_path), user or {})


def _merge(base: Any, over: Mapping[str, Any]) -> dict:
    merged = copy.deepcopy(base) if isinstance(base, Mapping) else {}
    for key, value in over.items():
        merged[key] = _merge(merged.get(key), value) if isinstance(value, Mapping) else copy.deepcopy(value)
    return merged


def check_config(config: MutableMapping[str, Any], schema_path: str | Path | Mapping[str, Any]) -> None:
    """Every problem of `config` against its schema, and those the schema cannot express (the
    defaults' frame count, width and height together), raised together as one ConfigError. A
    config without problems gets the schema's defaults filled in (in place) for keys it lacks, as
    Snakemake's validate(config, schema) does; a config with problems is left as it was."""
    schema = schema_path if isinstance(schema_path, Mapping) else yaml.safe_load(Path(schema_path).read_text())
    if not isinstance(config, Mapping):
        raise ConfigError([f"the config holds a {type(config).__name__}, not keys with values (key: value lines)"])
    problems: list[str] = []
    errors = jsonschema.Draft202012Validator(schema).iter_errors(config)
    for error in sorted(errors, key=lambda e: [str(part) for part in e.absolute_path]):
        problems += [p for p in _message(error, schema) if p not in problems]
    defaults = config.get("defaults")
    if isinstance(defaults, Mapping):
        from .sheet import SheetError, check_defaults

        try:
            check_defaults(defaults)
        except SheetError as err:
            problems += [p for p in err.problems if p not in problems]
    if problems:
        raise ConfigError(problems)
    fill_defaults(config, schema)


def fill_defaults(instance: Any, schema: Mapping[str, Any]) -> None:
    """Set each key the schema gives a `default` and `instance` lacks, at every depth (jsonschema's
    "set defaults" recipe, which Snakemake's validate uses)."""
    if not isinstance(instance, MutableMapping):
        return
    for key, sub in (schema.get("properties") or {}).items():
        if key not in instance and "default" in sub:
            instance[key] = copy.deepcopy(sub["default"])
        if key in instance:
            fill_defaults(instance[key], sub)
    for pattern, sub in (schema.get("patternProperties") or {}).items():
        for key in instance:
            if re.search(pattern, key):
                fill_defaults(instance[key], sub)


def _where(error: jsonschema.ValidationError) -> str:
    return ".".join(str(part) for part in error.absolute_path)


def _key_paths(schema: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """{key: its dotted path} for every named key of the schema, at any depth."""
    paths = {}
    for key, sub in (schema.get("properties") or {}).items():
        paths.setdefault(key, prefix + key)
        paths.update({k: v for k, v in _key_paths(sub, f"{prefix}{key}.").items() if k not in paths})
    return paths


def _pattern_names(pattern: str) -> list[str]:
    """The names a pattern like ^(high|low|vae)$ allows; [] for any other pattern."""
    match = re.fullmatch(r"\^\(([\w|.-]+)\)\$", pattern)
    return match[1].split("|") if match else []


def _alternative(sub: Mapping[str, Any]) -> str | None:
    """One branch of a oneOf/anyOf in words ('auto', an integer >= 1, ...), or None."""
    if "const" in sub:
        return repr(sub["const"])
    if "enum" in sub:
        return " or ".join(map(repr, sub["enum"]))
    kind = sub.get("type")
    words = {"integer": "an integer", "number": "a number", "boolean": "true or false", "string": "a text",
             "null": "null", "object": "keys with values", "array": "a list"}
    if isinstance(kind, str) and kind in words:
        text = words[kind]
        bounds = {"minimum": ">=", "exclusiveMinimum": ">", "maximum": "<=", "exclusiveMaximum": "<"}
        return text + "".join(f" {sign} {sub[key]}" for key, sign in bounds.items() if key in sub)
    return None


def _message(error: jsonschema.ValidationError, root: Mapping[str, Any]) -> list[str]:
    where = _where(error)
    if error.validator == "additionalProperties":
        properties = error.schema.get("properties") or {}
        patterns = error.schema.get("patternProperties") or {}
        known = sorted(properties)
        for pattern in patterns:
            known += _pattern_names(pattern) or [f"names matching {pattern}"]
        anywhere = _key_paths(root)
        out = []
        for key in sorted(set(error.instance) - set(properties), key=str):
            if any(re.search(p, str(key)) for p in patterns):
                continue
            close = difflib.get_close_matches(str(key), known, n=1)
            elsewhere = difflib.get_close_matches(str(key), list(anywhere), n=1)
            if close:
                hint = f" (did you mean {close[0]!r}?)"
            elif elsewhere:
                hint = f" (did you mean {anywhere[elsewhere[0]]!r}?)"
            elif len(known) <= 12:
                hint = f" (known here: {', '.join(known)})"
            else:
                hint = " (config/config.yaml describes every key)"
            out.append(f"{where + '.' if where else ''}{key}: unknown key{hint}")
        return out
    if error.validator in ("oneOf", "anyOf"):
        branches = error.validator_value
        if all(set(sub) == {"required"} for sub in branches):
            names = [name for sub in branches for name in sub["required"]]
            return [f"{where or 'config'}: give exactly one of {', '.join(map(repr, names))}"]
        words = [_alternative(sub) for sub in branches]
        if all(words):
            return [f"{where or 'config'}: {error.instance!r} is not {' or '.join(words)}"]
        return [f"{where}: {error.instance!r} is not allowed here ({error.schema.get('description', 'see config/config.yaml')})"]
    return [f"{where or 'config'}: {error.message}"]
