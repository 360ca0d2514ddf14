"""The batch as the report sees it: its rows and settings, read from the workflow's config, so that
no job parameter has to carry the sheet's free text (prompts, paths)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from ..layout import Layout
from ..sheet import Row, load_schema, read_rows
from .gallery import BatchInfo, build_gallery


def batch_info(config: Mapping[str, Any]) -> BatchInfo:
    """What the gallery shows besides the rows."""
    return BatchInfo(
        results=Layout(config["results"]).results,
        fps=config["video"]["fps"],
        checkpoints={key: config["models"][key] for key in ("high", "low", "vae", "text_encoder")},
        attention=f"{config['attention']} (SLA topk {config['sla_topk']})",
        embed=config["gallery"]["embed"],
    )


def sheet_rows(config: Mapping[str, Any], workflow_dir: str | Path) -> list[Row]:
    """The sheet's rows as the workflow read them (images' headers only: the workflow checked them)."""
    schema = load_schema(Path(workflow_dir) / "config" / "schemas" / "sheet.schema.yaml")
    return read_rows(config["sheet"], config["defaults"], schema, decode_images=False)


def build_batch_gallery(config: Mapping[str, Any], workflow_dir: str | Path, out_dir: str | Path) -> Path:
    return build_gallery(out_dir, sheet_rows(config, workflow_dir), batch_info(config))
