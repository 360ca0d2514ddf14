"""A row's LoRAs: the sheet's `loras` cell, the config's `loras`, and their check before any job.

The config names LoRA pairs, one file per expert (either may be absent: that expert then runs
without it):

    loras:
      motion: {high: loras/motion_high.safetensors, low: loras/motion_low.safetensors}
      style: {low: loras/style_low.safetensors}

A sheet row picks some by name with a scale: `motion:0.8;style:1` (empty: none). `plan_loras`
turns that into each row's LoRA set per expert ([{name, file, scale}], in name order, scale 0 and
absent files left out: a scale of 0 is the same row as no LoRA) and checks, when the workflow reads
the config and the sheet, that every name is known and every file the rows use is a Wan LoRA that
fits its expert (turbowan.wan.lora), naming the row and column, or the file and its first tensor
that does not fit. `grouped_positions` orders each wave's rows so that rows with one LoRA set are
next to each other (a worker keeps one merge of an expert at a time).
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Hashable, Iterable, Mapping, Sequence

EXPERTS = ("high", "low")
NAME = re.compile(r"^[A-Za-z0-9._-]+$")


def parse_loras_cell(text: str) -> tuple[tuple[str, float], ...]:
    """A sheet's `loras` cell -> ((name, scale), ...) in name order; ValueError with a short reason.

    Entries `name:scale` separated by `;`; spaces around either are ignored; the scale is any finite
    number (0: the LoRA is off; negative scales are allowed)."""
    entries: dict[str, float] = {}
    for part in text.split(";"):
        part = part.strip()
        if not part:
            continue
        name, colon, scale_text = (piece.strip() for piece in part.partition(":"))
        if not colon:
            raise ValueError(f"{part!r} has no scale; entries are name:scale separated by ';' (e.g. motion:0.8;style:1)")
        if not NAME.match(name):
            raise ValueError(f"{part!r}: a LoRA name is letters, digits, '.', '_' and '-'")
        try:
            scale = float(scale_text)
        except ValueError:
            raise ValueError(f"{part!r}: the scale {scale_text!r} is not a number") from None
        if not math.isfinite(scale):
            raise ValueError(f"{part!r}: the scale {scale_text!r} is not a finite number")
        if name in entries:
            raise ValueError(f"LoRA {name!r} is named twice")
        entries[name] = scale
    return tuple(sorted(entries.items()))


def format_loras(loras: Iterable[tuple[str, float]]) -> str:
    """((name, scale), ...) -> the cell's form, `motion:0.8;style:1`."""
    return ";".join(f"{name}:{scale:g}" for name, scale in loras)


@dataclass
class LoraPlan:
    # row id -> expert ("high" / "low") -> [{"name", "file", "scale"}] in merge (name) order
    sets: dict[str, dict[str, list[dict[str, Any]]]] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    def files(self, row_id: str, expert: str) -> list[str]:
        return [lora["file"] for lora in self.sets[row_id][expert]]

    def key(self, row_id: str, expert: str) -> tuple:
        """What makes two rows' merges of one expert the same."""
        return tuple((lora["file"], lora["scale"]) for lora in self.sets[row_id][expert])


def plan_loras(
    config_loras: Mapping[str, Mapping[str, str]] | None,
    rows: Iterable[Any],
    sheet: str,
    experts: Mapping[str, str | Sequence[str] | None],
    made_by_workflow: Iterable[str] = (),
    check: bool = True,
) -> LoraPlan:
    """Each row's LoRA set per expert, and every problem (see the module docstring).

    rows: the sheet's rows in order (sheet.Row: `id`, `line`, `loras`); experts: role -> the expert
    file to check the LoRAs against, or a list of candidates (the first that exists; none: the LoRAs
    are recognised now and fitted when the expert loads); made_by_workflow: LoRA files a
    rule makes (the demo's), which may be missing now; check=False: names only, no file is read (a
    job's own parse of the workflow: the main process checked them)."""
    config_loras = dict(config_loras or {})
    plan = LoraPlan()
    made = set(made_by_workflow)
    known = ", ".join(sorted(config_loras)) or "none"
    used: dict[tuple[str, str], str] = {}  # (expert, file) -> the config name that has it
    for number, row in enumerate(rows, start=1):
        plan.sets[row.id] = {expert: [] for expert in EXPERTS}
        for name, scale in getattr(row, "loras", ()):
            if name not in config_loras:
                line = getattr(row, "line", 0)
                where = f"row {number} ({f'line {line}, ' if line else ''}id {row.id!r})"
                plan.problems.append(f"{sheet}: {where}, column 'loras': unknown LoRA {name!r}; the config's "
                                     f"`loras` names: {known}")
                continue
            if float(scale) == 0:
                continue
            for expert in EXPERTS:
                file = (config_loras[name] or {}).get(expert)
                if file:
                    plan.sets[row.id][expert].append({"name": name, "file": str(file), "scale": float(scale)})
                    used.setdefault((expert, str(file)), name)
    if not check:
        return plan
    shapes_of: dict[str, Any] = {}
    for (expert, file), name in used.items():
        where = f"loras.{name}.{expert}"
        if not os.path.exists(file):
            if file not in made:
                plan.problems.append(f"{where}: {file} does not exist")
            continue
        problem = _check_file(file, expert, experts.get(expert), shapes_of)
        if problem:
            plan.problems.append(f"{where}: {problem}")
    return plan


def _check_file(file: str, expert: str, candidates: str | Sequence[str] | None, shapes_of: dict) -> str | None:
    from .files.formats import CheckpointError, read_index
    from .files.loras import inspect_lora
    from .wan.lora import check_lora, expert_shapes, lora_table

    candidates = [candidates] if isinstance(candidates, str) else list(candidates or ())
    expert_file = next((c for c in candidates if c and os.path.exists(c)), None)
    try:
        if expert_file:
            if expert_file not in shapes_of:
                shapes_of[expert_file] = expert_shapes(read_index(expert_file)[1])
            check_lora(file, shapes_of[expert_file], f"models.{expert} ({expert_file})")
        else:
            lora_table(inspect_lora(file))  # recognised now, fitted when the expert loads
    except CheckpointError as err:  # (LoraError is one)
        return str(err)
    return None


def grouped_positions(row_ids: list[str], key_of: Callable[[str], Hashable], wave_rows: int) -> dict[str, int]:
    """{row id: position} for a stage's priorities: the sheet's order, but inside each wave of
    `wave_rows` rows, rows with the same key (LoRA set) are next to each other, the sets in the order
    they first appear (the set the previous wave ended with first). Rows that all share one key
    (a sheet without LoRAs) keep their sheet positions."""
    positions: dict[str, int] = {}
    last = None
    for start in range(0, len(row_ids), wave_rows):
        groups: dict[Hashable, list[str]] = {}
        for row_id in row_ids[start:start + wave_rows]:
            groups.setdefault(key_of(row_id), []).append(row_id)
        order = list(groups)
        if last in groups:
            order.remove(last)
            order.insert(0, last)
        for offset, row_id in enumerate(r for key in order for r in groups[key]):
            positions[row_id] = start + offset
        last = order[-1]
    return positions
