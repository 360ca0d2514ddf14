"""The prompt sheet: read it, fill in defaults, check every row, and report every problem at once.

A row's problems are found before any job runs, each named by row number (data rows: row 1 is the
first under the header), the CSV line the row starts on, id and column, so a typo in row 412 does
not surface hours into a batch. A prompt longer than umT5 reads is named too (long_prompt_warnings).
"""

from __future__ import annotations

import csv
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

import jsonschema
import yaml

from .files.prompts import prompt_key
from .layout import id_problem, row_reference
from .loras import parse_loras_cell
from .wan.image import ImageError, image_size, open_rgb
from .wan.prompts import TEXT_LEN, token_counts
from .wan.sizes import choose_size, frames_ok, size_problem

REQUIRED = ("id", "image", "prompt")
INTEGER = ("seed", "num_frames", "width", "height", "num_steps")
NUMBER = ("sigma_max", "boundary")
BOOLEAN = ("adaptive", "ode")
TEXT = ("id", "image", "prompt", "resolution", "aspect_ratio", "loras", "last_image", "chain")
IMAGE_COLUMNS = ("image", "last_image")  # a path relative to the sheet, or @<id>: that row's last frame
COLUMNS = TEXT + INTEGER + NUMBER + BOOLEAN
TRUE, FALSE = {"true", "yes", "1", "y", "t"}, {"false", "no", "0", "n", "f"}


class SheetError(ValueError):
    """All problems of a sheet (or of the config's defaults), one per line."""

    def __init__(self, path: str | Path, problems: list[str], what: str = "in the sheet"):
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"{path}: {len(problems)} problem(s) {what}; nothing was run:\n{lines}")


@dataclass(frozen=True)
class Row:
    id: str
    image: str  # the sheet's folder joined with the cell, or "@<id>" (turbowan.layout.row_reference)
    prompt: str
    seed: int
    num_frames: int
    width: int
    height: int
    num_steps: int
    sigma_max: float
    boundary: float
    ode: bool
    line: int = 0  # where the row starts in the CSV file (1 = the header)
    loras: tuple[tuple[str, float], ...] = ()  # (name, scale) in name order (turbowan.loras)
    last_image: str | None = None  # as `image`; None: the video's end is free
    chain: str | None = None  # the name of the longer video this row is a part of

    def references(self) -> dict[str, str]:
        """{column: row id} for the image cells that name another row (`@<id>`)."""
        return image_references({column: getattr(self, column) for column in IMAGE_COLUMNS})

    @property
    def prompt_key(self) -> str:
        """Identical prompts share one text embedding, stored under this key."""
        return prompt_key(self.prompt)

    def video(self) -> dict[str, int]:
        return {"width": self.width, "height": self.height, "num_frames": self.num_frames}

    def sampling(self) -> dict[str, Any]:
        return {"seed": self.seed, "num_steps": self.num_steps, "sigma_max": self.sigma_max,
                "boundary": self.boundary, "ode": self.ode}

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def image_references(images: Mapping[str, str | None]) -> dict[str, str]:
    """{column: row id} for the cells of `images` ({column: cell}) that name another row (`@<id>`)."""
    return {column: ref for column, cell in images.items() if (ref := row_reference(cell)) is not None}


def _convert(column: str, text: str) -> Any:
    """A CSV cell -> its typed value; raises ValueError with a short reason."""
    if column == "loras":
        return parse_loras_cell(text)
    if column in INTEGER:
        try:
            value = float(text)
        except ValueError:
            raise ValueError(f"{text!r} is not a whole number") from None
        if not value.is_integer():
            raise ValueError(f"{text!r} is not a whole number")
        return int(value)
    if column in NUMBER:
        try:
            return float(text)
        except ValueError:
            raise ValueError(f"{text!r} is not a number") from None
    if column in BOOLEAN:
        low = text.strip().lower()
        if low in TRUE:
            return True
        if low in FALSE:
            return False
        raise ValueError(f"{text!r} is not true/false")
    return text


def _schema_message(error: jsonschema.ValidationError) -> str:
    value = error.instance
    if value == "" or error.validator == "minLength":
        return "is empty"
    if error.validator == "enum":
        return f"{value!r} is not one of {', '.join(map(str, error.validator_value))}"
    if error.validator == "pattern":
        return f"{value!r} may only use letters, digits, '.', '_' and '-'"
    if error.validator in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"):
        words = {"minimum": ">=", "maximum": "<=", "exclusiveMinimum": ">", "exclusiveMaximum": "<"}
        return f"{value!r} must be {words[error.validator]} {error.validator_value}"
    return error.message


def load_schema(path: str | Path) -> dict:
    return yaml.safe_load(Path(path).read_text())


def read_rows(
    path: str | Path, defaults: Mapping[str, Any], schema: Mapping[str, Any], decode_images: bool = True
) -> list[Row]:
    """Every row of the sheet with defaults filled in, or SheetError listing every problem.

    decode_images: decode every image fully (catches truncated files); jobs that re-read the
    sheet skip it, the Snakemake process that plans the batch does it once.
    """
    path = Path(path)
    if not path.is_file():
        raise SheetError(path, ["the sheet file does not exist"])
    header, records = read_table(path)

    # Problems of the sheet as a whole come first; they hide none of the rows' problems.
    problems: list[str] = []
    unnamed = [number for number, name in enumerate(header, start=1) if not name]
    if unnamed:
        problems.append(f"header cell(s) {', '.join(map(str, unnamed))} name no column (a trailing comma?)")
    unknown = [c for c in header if c and c not in COLUMNS]
    if unknown:
        problems.append(f"unknown column(s) {', '.join(map(repr, unknown))}; known columns: {', '.join(COLUMNS)}")
    twice = sorted({c for c in header if c and header.count(c) > 1}, key=header.index)
    if twice:
        problems.append(f"column(s) {', '.join(map(repr, twice))} appear more than once in the header")
    missing = [c for c in REQUIRED if c not in header]
    if missing:
        problems.append(f"missing required column(s): {', '.join(missing)}")
    if not records:
        raise SheetError(path, problems + ["the sheet has no rows"])

    validator = jsonschema.Draft202012Validator(schema)
    drafts: dict[str, _Draft] = {}  # id -> a row whose cells are fine
    seen: dict[str, tuple[int, int]] = {}  # id -> (row, line)
    for index, (line, record) in enumerate(records, start=1):
        cells: dict[str, str] = {}
        for name, text in zip(header, record):
            cells.setdefault(name, text)  # (a column named twice: its first cell)
        row_id = cells.get("id", "").strip()
        where = f"row {index} (line {line}, id {row_id!r})" if row_id else f"row {index} (line {line})"
        if len(record) > len(header):
            problems.append(f"{where}: {len(record)} cells, but the header names {len(header)} columns "
                            '(a cell that holds a comma must be in double quotes: "a, b")')
            continue
        row_problems: list[tuple[str, str]] = []  # (column, message)

        def problem(column: str, message: str) -> None:
            if column not in missing:  # a missing column is named once, above
                row_problems.append((column, message))

        values: dict[str, Any] = {}
        for column in COLUMNS:
            if column in missing:
                continue
            text = cells.get(column, "")
            if column not in REQUIRED:
                text = text.strip()
            if column == "id":
                text = text.strip()
            if text == "" and column not in REQUIRED:
                if defaults.get(column) is not None:
                    values[column] = defaults[column]
                continue
            try:
                values[column] = _convert(column, text)
            except ValueError as err:
                problem(column, str(err))
        for error in validator.iter_errors(values):
            if error.validator == "required":
                column = re.match(r"'(.+)' is a required property", error.message)[1]
                if column not in {c for c, _ in row_problems}:
                    problem(column, "is empty and the config has no default for it")
            else:
                problem(str(error.path[0]) if error.path else "?", _schema_message(error))

        bad = {column for column, _ in row_problems}
        if "id" not in bad and row_id:
            if reason := id_problem(row_id):
                problem("id", reason)
            elif row_id in seen:
                problem("id", "duplicate id; row {} (line {}) has it already".format(*seen[row_id]))
            seen.setdefault(row_id, (index, line))
        if "prompt" not in bad and not str(values.get("prompt", "")).strip():
            problem("prompt", "is empty")
        if "num_frames" not in bad and "num_frames" in values and not frames_ok(values["num_frames"]):
            problem("num_frames", f"{values['num_frames']} is not 4k+1 (e.g. 81, 49, 17)")

        images: dict[str, str] = {}  # column -> the image's path, or "@<id>"
        size = None  # the first image's (width, height); a referenced row's size is known later
        for column in IMAGE_COLUMNS:
            cell = str(values.get(column, "")).strip()
            if column in bad or not cell:
                if column == "image" and column not in bad:
                    problem("image", "is empty")
                continue
            if (ref := row_reference(cell)) is not None:
                images[column] = "@" + ref
                continue
            # relative to the sheet; kept relative when the sheet's path is, so a moved batch
            # folder does not look like a changed input
            image_path = Path(os.path.normpath(path.parent / cell))
            if not image_path.is_file():
                problem(column, f"{cell!r} does not exist (looked for {image_path})")
                continue
            try:
                # the full decode (planning process) gives the size too; jobs read the header only
                found = open_rgb(image_path).size if decode_images else image_size(image_path)
            except ImageError as err:
                problem(column, str(err))
                continue
            images[column] = str(image_path)
            if column == "image":
                size = found

        has_w, has_h = values.get("width") is not None, values.get("height") is not None
        if has_w != has_h:
            problem("width" if not has_w else "height", "width and height must be given together")
        if not row_problems:
            if (values.get("adaptive") and not (has_w and has_h) and size is None
                    and row_reference(images.get("image")) is None):
                problem("adaptive", "adaptive sizing needs a readable image")
        if row_problems:
            problems.extend(f"{where}, column '{column}': {message}" for column, message in row_problems)
            continue
        if missing:  # (the row's other cells are checked; it cannot be a row without these)
            continue
        drafts[row_id] = _Draft(where, line, values, images, size)

    graph = {row_id: [ref for ref in _references(draft).values() if ref in drafts] for row_id, draft in drafts.items()}
    order, cycles = reference_order(graph)
    problems += _reference_problems(drafts, set(seen), cycles)
    rows = _sized_rows(drafts, order, cycles, problems)
    problems += _chain_problems(rows, drafts)
    if problems:
        raise SheetError(path, problems)
    return rows


@dataclass
class _Draft:
    """A row whose cells passed their checks, before its size: a row that starts from another row's
    last frame takes that row's size, known once the other row is sized."""
    where: str  # "row N (line L, id 'x')", for problems
    line: int
    values: dict[str, Any]
    images: dict[str, str]  # column -> path or "@<id>"
    size: tuple[int, int] | None  # the first image's, when it is a file


def _references(draft: _Draft) -> dict[str, str]:
    return image_references(draft.images)


def _reference_problems(drafts: Mapping[str, _Draft], ids: set[str], cycles: list[list[str]]) -> list[str]:
    """`@<id>` cells that name no row of the sheet, and the `cycles` of rows that reach themselves
    through them (reference_order's)."""
    problems = []
    for draft in drafts.values():
        for column, ref in _references(draft).items():
            if ref not in ids:
                problems.append(f"{draft.where}, column '{column}': '@{ref}' names no row of the sheet "
                                "(an image file whose name starts with '@' is written ./@name)")
    for cycle in cycles:
        row_id, ref = cycle[-2], cycle[-1]
        column = next(c for c, r in _references(drafts[row_id]).items() if r == ref)
        problems.append(f"{drafts[row_id].where}, column '{column}': '@{ref}' closes a cycle of rows, "
                        f"each starting from the next one's frames: {' -> '.join(cycle)}")
    return problems


def reference_order(graph: Mapping[str, Iterable[str]]) -> tuple[list[str], list[list[str]]]:
    """(every id after the ids it refers to, the cycles: each a path that ends where it starts).
    Iterative, so a chain of thousands of rows is no deeper a recursion than one row."""
    order: list[str] = []
    cycles: list[list[str]] = []
    state: dict[str, int] = {}  # 1: on the path being followed, 2: done
    for start in graph:
        if start in state:
            continue
        path, stack = [start], [iter(graph[start])]
        state[start] = 1
        while stack:
            ref = next(stack[-1], None)
            if ref is None:  # every reference of path[-1] followed
                state[path[-1]] = 2
                order.append(path.pop())
                stack.pop()
            elif state.get(ref) == 1:
                cycles.append(path[path.index(ref):] + [ref])
            elif ref not in state:
                state[ref] = 1
                path.append(ref)
                stack.append(iter(graph[ref]))
    return order, cycles


def _sized_rows(drafts: Mapping[str, _Draft], order: list[str], cycles: list[list[str]],
                problems: list[str]) -> list[Row]:
    """The Rows in sheet order, each sized after the row it starts from (`order`: reference_order's);
    a row that starts from a row with problems, or from a cycle (_reference_problems names both), is
    left out."""
    in_cycles = {row_id for cycle in cycles for row_id in cycle}
    rows: dict[str, Row] = {}
    for row_id in order:
        draft, values = drafts[row_id], drafts[row_id].values
        if row_id in in_cycles or any(ref not in rows for ref in _references(draft).values()):
            continue
        ref = row_reference(draft.images["image"])
        if ref is not None and values.get("width") is None:  # a part of a longer video: the size of the part before
            values = dict(values, width=rows[ref].width, height=rows[ref].height)
        width, height = choose_size(
            values["resolution"], values["aspect_ratio"], bool(values.get("adaptive")),
            values.get("width"), values.get("height"), draft.size,
        )
        reason = size_problem(width, height)
        if reason:
            problems.append(f"{draft.where}, column 'width/height': the chosen size {width}x{height}: {reason}")
            continue
        rows[row_id] = Row(
            id=row_id, image=draft.images["image"], prompt=values["prompt"], seed=values["seed"],
            num_frames=values["num_frames"], width=width, height=height, num_steps=values["num_steps"],
            sigma_max=float(values["sigma_max"]), boundary=float(values["boundary"]), ode=bool(values["ode"]),
            line=draft.line, loras=values.get("loras", ()), last_image=draft.images.get("last_image"),
            chain=values.get("chain"),
        )
    return [rows[row_id] for row_id in drafts if row_id in rows]


def chain_depths(rows: Iterable[Row]) -> dict[str, int]:
    """{row id: 0 when the row starts from pictures, else one more than the deepest row it starts or
    ends on}. Rows of one depth never wait for each other."""
    rows = {row.id: row for row in rows}
    depths: dict[str, int] = {}
    for row_id in reference_order({row_id: list(row.references().values()) for row_id, row in rows.items()})[0]:
        depths[row_id] = 1 + max((depths[ref] for ref in rows[row_id].references().values()), default=-1)
    return depths


def chains(rows: Iterable[Row]) -> dict[str, list[Row]]:
    """{chain name: its rows in sheet order}."""
    found: dict[str, list[Row]] = {}
    for row in rows:
        if row.chain is not None:
            found.setdefault(row.chain, []).append(row)
    return found


def continues(members: list[Row]) -> list[bool]:
    """Per row of a chain: does it start from the row before it (`@` that row)? Its first frame then
    repeats that row's last one, and the chain's video leaves it out."""
    return [index > 0 and row.references().get("image") == members[index - 1].id for index, row in enumerate(members)]


def _chain_problems(rows: list[Row], drafts: Mapping[str, _Draft]) -> list[str]:
    """A chain's rows are joined into one video: they must share one size."""
    problems, first = [], {}
    for row in rows:
        if row.chain is None:
            continue
        head = first.setdefault(row.chain, row)
        if (row.width, row.height) != (head.width, head.height):
            problems.append(f"{drafts[row.id].where}, column 'chain': the rows of chain {row.chain!r} are joined "
                            f"into one video and must share one size; this row is {row.width}x{row.height}, "
                            f"row {head.id!r} is {head.width}x{head.height}")
    return problems


def read_table(path: str | Path) -> tuple[list[str], list[tuple[int, list[str]]]]:
    """The sheet's header (names stripped) and its records, each with the CSV line it starts on
    (line 1 is the header's; a quoted prompt may span lines). Lines that are empty or only spaces
    and tabs are skipped. SheetError when the file is not UTF-8 or not CSV."""
    records: list[tuple[int, list[str]]] = []
    start = 1
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f, strict=True)
            for record in reader:
                if record and not (len(record) == 1 and not record[0].strip(" \t")):
                    records.append((start, record))
                start = reader.line_num + 1
    except UnicodeDecodeError as err:
        raise SheetError(path, [f"cannot be read as a UTF-8 CSV file ({err})"]) from err
    except csv.Error as err:
        if "end of data" in str(err):
            reason = f"line {start}: a quoted cell that starts on this line is never closed (a missing \")"
        else:
            reason = (f"line {reader.line_num}: {err} (inside a quoted cell, write a double quote twice: "
                      '"a ""word"" here")')
        raise SheetError(path, [f"cannot be read as a CSV file: {reason}"]) from err
    if not records:
        raise SheetError(path, [f"the sheet is empty; its first line names the columns: {', '.join(REQUIRED)}, ..."])
    return [name.strip() for name in records[0][1]], records[1:]


def prompt_token_counts(prompts: Mapping[str, str], tokenizer_dir: str | Path) -> dict[str, int]:
    """{key: how many tokens umT5 gets from the prompt}: cleaned as the text stage cleans it, EOS
    included, never cut (turbowan.wan.prompts). Reads `tokenizer.json` of the folder with the
    `tokenizers` library only (fast, no transformers); {} while the folder has none (the demo's
    tokenizer is made by a rule)."""
    return token_counts(prompts, tokenizer_dir)


def long_prompt_warnings(rows: Iterable[Row], counts: Mapping[str, int], limit: int = TEXT_LEN) -> list[str]:
    """A line for each row whose prompt has more than `limit` tokens; `counts` is
    prompt_token_counts({row.prompt_key: row.prompt for row in rows}, tokenizer_dir)."""
    warnings = []
    for row in rows:
        tokens = counts.get(row.prompt_key)
        if tokens is not None and tokens > limit:
            at = f" (line {row.line})" if row.line else ""
            warnings.append(f"row {row.id!r}{at}: its prompt has {tokens} tokens; "
                            f"umT5 reads the first {limit}, the rest is ignored")
    return warnings


def check_defaults(defaults: Mapping[str, Any], where: str = "config") -> None:
    """The rules the schema cannot express, for the config's `defaults`."""
    problems = []
    frames = defaults.get("num_frames")
    if frames is not None and not frames_ok(frames):
        problems.append(f"defaults.num_frames: {frames} is not 4k+1 (e.g. 81, 49, 17)")
    if (defaults.get("width") is None) != (defaults.get("height") is None):
        problems.append("defaults.width and defaults.height must be given together (or both null)")
    if problems:
        raise SheetError(where, problems, what="in the config")
