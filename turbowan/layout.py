"""Every path under a batch's results folder, built in one place.

The rules, the summary, the gallery and `turbowan check` all ask this module where a file is, so the
layout is spelled once. A path may be a pattern: pass "{id}" (or "{prompt_key}") as the key and the
rules get a wildcard.

    <results>/prompts/<prompt_key>/text.safetensors   shared by rows with one prompt
    <results>/<id>/cond.safetensors, boundary.safetensors, latent.safetensors, frames/, video.mp4,
                   contact_sheet.png, preview.gif
                   last_frame.png                 when another row starts from it (`@<id>`)
    <results>/chains/<chain>.mp4                      a chain's rows joined
    <results>/logs/<rule>/<key>.log, <results>/benchmarks/<rule>/<key>.tsv
    <results>/summary.csv, contact_sheet.png, gallery/
"""

from __future__ import annotations

from dataclasses import dataclass

# The stages of one row, in order, and the artifact each writes.
STAGES = ("encode_prompt", "encode_image", "sample_high", "sample_low", "decode", "encode_video")
ROW_ARTIFACTS = {
    "encode_image": "cond.safetensors",
    "sample_high": "boundary.safetensors",
    "sample_low": "latent.safetensors",
    "decode": "frames",
    "encode_video": "video.mp4",
}
PROMPTS, LOGS, BENCHMARKS, GALLERY, CHAINS = "prompts", "logs", "benchmarks", "gallery", "chains"
SUMMARY, BATCH_SHEET = "summary.csv", "contact_sheet.png"
# Names the batch itself uses at the top of the results folder: no row id may take one.
BATCH_NAMES = frozenset({PROMPTS, LOGS, BENCHMARKS, GALLERY, CHAINS, SUMMARY, BATCH_SHEET})


def id_problem(row_id: str) -> str | None:
    """Why `row_id` cannot name a folder of its own under the results folder, or None."""
    if row_id.startswith("."):
        return f"{row_id!r} starts with a dot ('.', '..' and hidden names would leave or hide in the results folder)"
    if row_id in BATCH_NAMES:
        return f"{row_id!r} is the name of one of the batch's own files or folders ({', '.join(sorted(BATCH_NAMES))})"
    return None


def row_reference(cell: str | None) -> str | None:
    """The row id an image cell names as `@<id>` (that row's last frame), else None: a path
    (`./@name.png` is a file whose name starts with '@')."""
    return cell[1:].strip() if cell is not None and cell.startswith("@") else None


@dataclass(frozen=True)
class Layout:
    results: str

    def __post_init__(self):
        object.__setattr__(self, "results", str(self.results).rstrip("/") or ".")

    def _join(self, *parts: str) -> str:
        return "/".join((self.results, *parts))

    # one prompt
    def text(self, prompt_key: str) -> str:
        return self._join(PROMPTS, prompt_key, "text.safetensors")

    # one row
    def row(self, row_id: str, name: str) -> str:
        return self._join(row_id, name)

    def artifact(self, stage: str, row_id: str) -> str:
        """What `stage` writes for a row (not encode_prompt: that is per prompt, see `text`)."""
        return self.row(row_id, ROW_ARTIFACTS[stage])

    def cond(self, row_id: str) -> str:
        return self.artifact("encode_image", row_id)

    def boundary(self, row_id: str) -> str:
        return self.artifact("sample_high", row_id)

    def latent(self, row_id: str) -> str:
        return self.artifact("sample_low", row_id)

    def frames(self, row_id: str) -> str:
        return self.artifact("decode", row_id)

    def video(self, row_id: str) -> str:
        return self.artifact("encode_video", row_id)

    def contact_sheet(self, row_id: str) -> str:
        return self.row(row_id, "contact_sheet.png")

    def preview(self, row_id: str) -> str:
        return self.row(row_id, "preview.gif")

    def last_frame(self, row_id: str) -> str:
        """The row's last decoded frame, kept for the rows that start (or end) on it."""
        return self.row(row_id, "last_frame.png")

    def image(self, cell: str) -> str:
        """The file an image cell of a Row stands for: its path, or for `@<id>` that row's last frame."""
        ref = row_reference(cell)
        return cell if ref is None else self.last_frame(ref)

    def chain(self, name: str) -> str:
        return self._join(CHAINS, f"{name}.mp4")

    # bookkeeping
    def log(self, rule: str, key: str) -> str:
        return self._join(LOGS, rule, f"{key}.log")

    def benchmark(self, rule: str, key: str) -> str:
        return self._join(BENCHMARKS, rule, f"{key}.tsv")

    # the batch
    @property
    def summary(self) -> str:
        return self._join(SUMMARY)

    @property
    def batch_sheet(self) -> str:
        return self._join(BATCH_SHEET)

    @property
    def gallery(self) -> str:
        return self._join(GALLERY)
