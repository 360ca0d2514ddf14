"""`turbowan`: helpers for a batch's results, usable while or after Snakemake runs.

    turbowan status <results> [--configfile config.yaml]   the summary table (rebuilt from disk)
    turbowan check [--configfile my.yaml] [--repair]       damaged artifacts (removed with --repair)
    turbowan inspect <artifact.safetensors>                tensors and the recorded provenance

`inspect` reads only a safetensors header (names, shapes, dtypes, metadata): it never loads
tensors and never unpickles anything, so it is safe on any file.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from safetensors import SafetensorError, safe_open

from .files.artifacts import META_KEY
from .report.summary import SUMMARY_NAME, build_summary, format_table, rows_from_summary, write_summary


WORKFLOW = Path(__file__).resolve().parent.parent  # the checkout: Snakefile, config/


def merged_config(configfile: str | None) -> dict:
    """config/config.yaml with `configfile` merged over it key by key, as Snakemake merges a
    --configfile over the workflow's own config (so a my.yaml may hold only what differs), checked
    and with the schema's defaults filled in, as the workflow checks it (ConfigError: every problem).
    Relative paths in it are relative to the current folder, as in a run from the workflow's folder."""
    from .settings import check_config, load_configfile, merge_config

    config = merge_config(load_configfile(configfile) if configfile else {}, WORKFLOW / "config" / "config.yaml")
    check_config(config, WORKFLOW / "config" / "schemas" / "config.schema.yaml")
    return config


def _rows_from_config(configfile: str | None):
    """The sheet's rows, read with the config's defaults as the workflow reads them, and the results folder."""
    from .report.batch import sheet_rows

    config = merged_config(configfile)
    return sheet_rows(config, WORKFLOW), config["results"]


def check(args: argparse.Namespace) -> int:
    """Damaged artifacts of the batch: listed (exit 1 if any), or with --repair removed (exit 0)."""
    from .check import find_damage, repair

    rows, results = _rows_from_config(args.configfile)
    damage = find_damage(results, rows)
    for item in damage:
        print(item)
    if not damage:
        print(f"{results}: no damaged artifact among {len(rows)} rows")
        return 0
    if args.repair:
        for path in repair(damage):
            print(f"removed {path}")
        print("the next run remakes them, and what was made from them")
        return 0
    print(f"{len(damage)} damaged; `turbowan check --repair` removes them for the next run to remake")
    return 1


def status(args: argparse.Namespace) -> int:
    results = Path(args.results) if args.results else None
    if args.configfile:
        rows, configured = _rows_from_config(args.configfile)
        results = results or Path(configured)
    elif results is None:
        print("turbowan status: give a results folder or --configfile", file=sys.stderr)
        return 2
    elif (results / SUMMARY_NAME).is_file():
        rows = rows_from_summary(results)
    else:
        print(f"turbowan status: {results / SUMMARY_NAME} does not exist yet (no run has finished there); "
              "pass --configfile to build it from the sheet", file=sys.stderr)
        return 2
    write_summary(results, rows)
    print(format_table(build_summary(results, rows)))
    return 0


def describe(path: str | Path) -> str:
    """A safetensors file's tensors and, for pipeline artifacts, the recorded stage and parameters."""
    path = Path(path)
    with open(path, "rb") as f:
        magic = f.read(8)
    if magic[:2] == b"PK" or magic[:1] == b"\x80":
        raise ValueError(f"{path}: a pickle/zip (.pth-style) file; inspect only reads safetensors, it never unpickles")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = [(name, f.get_slice(name).get_shape(), f.get_slice(name).get_dtype()) for name in f.keys()]
    except (SafetensorError, OSError) as err:
        raise ValueError(f"{path}: not a readable safetensors file ({err})") from err
    lines = [f"{path}", f"tensors ({len(tensors)}):"]
    width = max((len(name) for name, _, _ in tensors), default=0)
    lines += [f"  {name.ljust(width)}  {str(list(shape)):<24} {dtype}" for name, shape, dtype in tensors]
    if META_KEY in meta:
        record = json.loads(meta[META_KEY])
        lines.append(f"stage: {record.get('stage')}")
        lines.append("params:")
        lines += [f"  {k} = {v!r}" for k, v in sorted(record.get("params", {}).items())]
        lines.append("made from:")
        for name, fp in sorted(record.get("inputs", {}).items()):
            ident = fp.get("sha256", "")[:16] or f"mtime_ns={fp.get('mtime_ns', '')}"
            lines.append(f"  {name}: {fp.get('path')} ({fp.get('size', '?')} bytes, {ident})".rstrip())
        lines.append("versions: " + ", ".join(f"{k} {v}" for k, v in sorted(record.get("versions", {}).items())))
    else:
        lines.append(f"no '{META_KEY}' record (not written by this pipeline)")
        other = {k: v for k, v in meta.items() if k != META_KEY}
        if other:
            lines.append("metadata: " + json.dumps(other, sort_keys=True)[:2000])
    return "\n".join(lines)


def inspect(args: argparse.Namespace) -> int:
    status_code = 0
    for path in args.artifacts:
        try:
            print(describe(path))
        except (ValueError, OSError) as err:
            print(f"turbowan inspect: {err}", file=sys.stderr)
            status_code = 1
    return status_code


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="turbowan", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p_status = sub.add_parser("status", help="print the batch's summary table (rebuilds <results>/summary.csv)")
    p_status.add_argument("results", nargs="?", help="the results folder (config key `results`)")
    p_status.add_argument("--configfile", help="read the rows from this config's sheet instead of summary.csv")
    p_status.set_defaults(func=status)
    p_check = sub.add_parser("check", help="find damaged artifacts of a batch (--repair removes them)")
    p_check.add_argument("--configfile", help="the batch's config (default: config/config.yaml, the demo)")
    p_check.add_argument("--repair", action="store_true", help="delete each damaged file for the next run to remake")
    p_check.set_defaults(func=check)
    p_inspect = sub.add_parser("inspect", help="print a stage file's tensors and recorded parameters")
    p_inspect.add_argument("artifacts", nargs="+", help="safetensors files")
    p_inspect.set_defaults(func=inspect)
    args = parser.parse_args(argv)
    from .settings import ConfigError
    from .sheet import SheetError

    try:
        return args.func(args)
    except (ConfigError, SheetError) as err:  # the user's config or sheet: every problem, no traceback
        print(f"turbowan {args.command}: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
