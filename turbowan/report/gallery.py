"""The batch gallery: one HTML page (plus its media files) showing every row of a batch.

Snakemake's report viewer offers an mp4 only as a download, so the report carries this folder
(`report(directory(...), htmlindex="index.html")`): the summary table, then per row the input
image (and last image), the prompt, the parameters, stage timings, an HTML5 <video> player, the
animated preview and the contact sheet, or the error of a failed row; and each chain's joined video.
It is built from whatever exists, so it can be made after a batch where rows failed.
"""

from __future__ import annotations

import base64
import html
import io
import logging
import mimetypes
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

from PIL import Image

from ..files.artifacts import atomic_dir
from ..layout import Layout, row_reference
from ..loras import format_loras
from ..sheet import chains
from ..wan.image import ImageError, open_rgb
from .summary import DONE, FAILED, PLAIN_TORCH_WARNING, STAGES, build_summary

log = logging.getLogger(__name__)

INDEX = "index.html"
# Chromium refuses a data: URL above 2 MB in an iframe, which is how a .html report shows the page.
EMBED_WARN_BYTES = 1_500_000
IMAGE_MAX_SIDE = 512  # the input image is shown as a downscaled PNG copy
VIDEO_SIDE = 320  # the player's longer side, px

STYLE = """
body { font-family: sans-serif; margin: 1.5em; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0; }
td, th { border: 1px solid #ccc; padding: 2px 8px; text-align: left; font-size: 0.9em; }
.done { background: #e3f4e3; } .failed { background: #fbe0e0; } .missing { background: #f2f2f2; }
section.row { border-top: 2px solid #888; margin-top: 2em; padding-top: 0.5em; }
.media { display: flex; flex-wrap: wrap; gap: 1em; align-items: flex-start; }
.media figure { margin: 0; } figcaption { font-size: 0.8em; color: #555; }
.error { background: #fbe0e0; border: 1px solid #c33; padding: 0.5em; white-space: pre-wrap; }
.warning { background: #fff4d6; border: 1px solid #c90; padding: 0.5em; }
.prompt { font-style: italic; white-space: pre-wrap; }
img.scaled { max-width: 320px; max-height: 320px; min-width: 160px; image-rendering: pixelated; }
video { image-rendering: pixelated; background: #000; }
"""


@dataclass
class BatchInfo:
    """What the page shows besides the rows: the checkpoints, attention backend, fps, results folder."""

    results: str
    fps: int
    checkpoints: Mapping[str, str] = field(default_factory=dict)
    attention: str = "sdpa"
    embed: bool = False  # media inside index.html (see Media)


def _link_or_copy(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)  # no second copy of every video when results and gallery share a disk
    except OSError:
        shutil.copyfile(src, dst)


def _esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _table(rows: Iterable[Iterable[Any]], head: Iterable[Any] | None = None, raw: bool = False) -> str:
    cell = (lambda v: str(v)) if raw else _esc
    out = ["<table>"]
    if head is not None:
        out.append("<tr>" + "".join(f"<th>{_esc(h)}</th>" for h in head) + "</tr>")
    for r in rows:
        out.append("<tr>" + "".join(f"<td>{cell(v)}</td>" for v in r) + "</tr>")
    out.append("</table>")
    return "\n".join(out)


def _seconds(value: Any) -> str:
    return f"{float(value):.1f} s" if value not in ("", None) else ""


def _summary_table(lines: list[dict[str, Any]]) -> str:
    head = ["row", "state", *STAGES, "total", "error"]
    out = ["<table id='summary'>", "<tr>" + "".join(f"<th>{_esc(h)}</th>" for h in head) + "</tr>"]
    for line in lines:
        cells = [f"<td><a href='#row-{_esc(line['id'])}'>{_esc(line['id'])}</a></td>",
                 f"<td class='{_esc(line['state'])}'>{_esc(line['state'])}</td>"]
        for stage in STAGES:
            state = line[f"{stage}_state"]
            text = _seconds(line[f"{stage}_s"]) if state == DONE else state
            cells.append(f"<td class='{_esc(state)}'>{_esc(text)}</td>")
        cells.append(f"<td>{_esc(_seconds(line['total_s']))}</td>")
        cells.append(f"<td>{_esc(line['error'])}</td>")
        out.append("<tr class='summary-row'>" + "".join(cells) + "</tr>")
    out.append("</table>")
    return "\n".join(out)


def _parameters(row: Any, info: BatchInfo) -> list[tuple[str, Any]]:
    params = [
        ("seed", row.seed), ("size", f"{row.width} x {row.height}"),
        ("frames", f"{row.num_frames} ({row.num_frames / info.fps:.2f} s at {info.fps} fps)"),
        ("steps", row.num_steps), ("sigma_max", row.sigma_max), ("boundary", row.boundary),
        ("sampler", "ODE" if row.ode else "SDE"), ("attention", info.attention),
    ]
    params += [(f"checkpoint {name}", Path(path).name) for name, path in info.checkpoints.items()]
    if getattr(row, "loras", ()):  # the sheet's `loras` cell (name:scale;...), escaped by _table
        params.append(("LoRAs", format_loras(row.loras)))
    for column, what in (("image", "starts from"), ("last_image", "ends on")):
        cell = getattr(row, column, None)
        if cell:
            ref = row_reference(cell)
            params.append((what, f"the last frame of row {ref}" if ref is not None else Path(cell).name))
    if getattr(row, "chain", None):
        params.append(("chain", f"{row.chain} (chains/{row.chain}.mp4)"))
    return params


def _display_size(width: int, height: int, side: int = VIDEO_SIDE) -> tuple[int, int]:
    """The player's size: the video's aspect ratio, the longer side `side` px (tiny videos scaled up)."""
    scale = side / max(width, height)
    return round(width * scale), round(height * scale)


def _row_section(row: Any, line: dict[str, Any], media: dict[str, str], info: BatchInfo) -> str:
    rid = _esc(row.id)
    parts = [f"<section class='row {_esc(line['state'])}-row' id='row-{rid}' data-row='{rid}'>",
             f"<h2>{rid} <small class='{_esc(line['state'])}'>{_esc(line['state'])}</small></h2>"]
    if line["state"] == FAILED:
        parts.append(f"<p class='error'>{_esc(line['failed_stage'])} failed: {_esc(line['error'])}</p>")
    if line.get("kernels"):
        parts.append(f"<p class='warning kernels'>{_esc(PLAIN_TORCH_WARNING)}: {_esc(line['kernels'])}</p>")
    parts.append(f"<p class='prompt'>{_esc(row.prompt)}</p>")
    figures = []
    for kind, caption in (("image", "first frame"), ("last_image", "last frame")):
        if kind in media:
            figures.append(f"<figure><img class='scaled input-{kind.replace('_', '-')}' src='{_esc(media[kind])}' "
                           f"alt='{caption} of {rid}'><figcaption>given {caption}</figcaption></figure>")
    if "video" in media:
        width, height = _display_size(row.width, row.height)
        figures.append(
            f"<figure><video class='row-video' controls muted loop playsinline preload='metadata' "
            f"width='{width}' height='{height}' src='{_esc(media['video'])}'></video>"
            f"<figcaption>video ({row.width} x {row.height}, {row.num_frames} frames)</figcaption></figure>"
        )
    if "preview" in media:
        figures.append(f"<figure><img class='scaled preview' src='{_esc(media['preview'])}' "
                       f"alt='animated preview of {rid}'>"
                       "<figcaption>animated preview</figcaption></figure>")
    parts.append("<div class='media'>" + "".join(figures) + "</div>")
    timings = [(stage, line[f"{stage}_state"], _seconds(line[f"{stage}_s"])) for stage in STAGES]
    parts.append("<div class='media'>" + _table(_parameters(row, info), ["parameter", "value"])
                 + _table(timings, ["stage", "state", "time"]) + "</div>")
    if "contact_sheet" in media:
        parts.append(f"<figure><img class='contact-sheet' src='{_esc(media['contact_sheet'])}' "
                     f"alt='contact sheet of {rid}'><figcaption>contact sheet</figcaption></figure>")
    parts.append("</section>")
    return "\n".join(parts)


class Media:
    """Where the page's media go: files beside index.html, or (embed) data: URIs inside it.

    Embedding makes index.html the folder's only file, which a single-file `--report report.html`
    requires; Chromium refuses an embedded page above 2 MB, so it suits small batches only.
    """

    def __init__(self, folder: Path, embed: bool):
        self.folder, self.embed = folder, embed

    def add_file(self, src: Path, rel: str) -> str:
        if self.embed:
            return _data_uri(src.read_bytes(), mimetypes.guess_type(src.name)[0] or "application/octet-stream")
        _link_or_copy(src, self.folder / rel)
        return rel

    def add_png(self, image: Image.Image, rel: str) -> str:
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        if self.embed:
            return _data_uri(buffer.getvalue(), "image/png")
        (self.folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (self.folder / rel).write_bytes(buffer.getvalue())
        return rel


def _data_uri(data: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def _row_media(row: Any, results: Path, media: Media) -> dict[str, str]:
    """A row's existing media, added to the page; {kind: the src to use}."""
    refs = {}
    for kind, name in (("video", "video.mp4"), ("preview", "preview.gif"), ("contact_sheet", "contact_sheet.png")):
        src = results / row.id / name
        if src.is_file():
            refs[kind] = media.add_file(src, f"{row.id}/{name}")
    layout = Layout(str(results))
    for kind, name in (("image", "input.png"), ("last_image", "last_input.png")):
        cell = getattr(row, kind, None)
        if not cell:
            continue
        try:  # (`@<id>`: that row's last frame, once it is made)
            image = open_rgb(layout.image(cell))
            image.thumbnail((IMAGE_MAX_SIDE, IMAGE_MAX_SIDE))
            refs[kind] = media.add_png(image, f"{row.id}/{name}")
        except ImageError:  # an image gone since the sheet was read (or not made yet) is left out
            pass
    return refs


def _chains_section(rows: list[Any], results: Path, media: Media) -> str:
    """The sheet's chains: each one's joined video, or which of its rows it waits for."""
    found = chains(rows)
    if not found:
        return ""
    layout = Layout(str(results))
    parts = ["<h2 id='chains'>Chains</h2>", "<div class='media'>"]
    for name, members in found.items():
        ids = " + ".join(_esc(row.id) for row in members)
        video = Path(layout.chain(name))
        if video.is_file():
            src = media.add_file(video, f"chains/{name}.mp4")
            width, height = _display_size(members[0].width, members[0].height)
            body = (f"<video class='chain-video' controls muted loop playsinline preload='metadata' width='{width}' "
                    f"height='{height}' src='{_esc(src)}'></video>")
        else:
            body = "<p class='missing'>not made yet</p>"
        parts.append(f"<figure class='chain' data-chain='{_esc(name)}'>{body}"
                     f"<figcaption>chain {_esc(name)}: {ids}</figcaption></figure>")
    parts.append("</div>")
    return "\n".join(parts)


def render_page(rows: list[Any], lines: list[dict[str, Any]], media: dict[str, dict[str, str]],
                info: BatchInfo, batch_sheet: str | None, chains_section: str = "") -> str:
    """The page; `media` maps each row id to {kind: src}; `chains_section` is _chains_section's."""
    counts = {s: sum(1 for line in lines if line["state"] == s) for s in (DONE, FAILED)}
    parts = [
        "<!DOCTYPE html>", "<html lang='en'><head><meta charset='utf-8'>",
        f"<title>TurboWan batch: {_esc(info.results)}</title><style>{STYLE}</style></head><body>",
        f"<h1>TurboWan batch <code>{_esc(info.results)}</code></h1>",
        f"<p id='counts'>{len(lines)} rows: {counts[DONE]} done, {counts[FAILED]} failed, "
        f"{len(lines) - counts[DONE] - counts[FAILED]} incomplete.</p>",
    ]
    slow = [line["id"] for line in lines if line.get("kernels")]
    if slow:
        parts.append(f"<p class='warning kernels' id='kernels-warning'>{_esc(PLAIN_TORCH_WARNING)}: "
                     f"{len(slow)} of {len(lines)} rows ({_esc(', '.join(map(str, slow)))}). "
                     "On the GPU machine, <code>make gpu</code> installs turbodiffusion.</p>")
    parts.append(_summary_table(lines))
    if batch_sheet:
        parts.append(f"<h2>Contact sheet of the batch</h2><img class='contact-sheet batch' src='{_esc(batch_sheet)}' "
                     "alt='contact sheet of the batch'>")
    if chains_section:
        parts.append(chains_section)
    for row, line in zip(rows, lines):
        parts.append(_row_section(row, line, media[row.id], info))
    parts.append("</body></html>")
    return "\n".join(parts)


def build_gallery(out_dir: str | Path, rows: Iterable[Any], info: BatchInfo) -> Path:
    """Write the gallery folder (index.html + media) for `rows` (sheet Rows), replacing it whole."""
    out_dir = Path(out_dir)
    rows = list(rows)
    results = Path(info.results)
    lines = build_summary(results, rows)
    with atomic_dir(out_dir, mode=0o755) as tmp:
        media = Media(tmp, info.embed)
        refs = {row.id: _row_media(row, results, media) for row in rows}
        batch = results / "contact_sheet.png"
        batch_ref = media.add_file(batch, "contact_sheet.png") if batch.is_file() else None
        page = render_page(rows, lines, refs, info, batch_ref, _chains_section(rows, results, media))
        (tmp / INDEX).write_text(page, encoding="utf-8")
        if info.embed and len(page) > EMBED_WARN_BYTES:
            log.warning("%s is %.1f MB with its media embedded; Chromium refuses embedded pages above 2 MB "
                        "inside a .html report: set gallery.embed to false and use --report report.zip",
                        out_dir / INDEX, len(page) / 1e6)
    return out_dir / INDEX
