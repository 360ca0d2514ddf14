"""Which model file each stage reads, which need prepare_models or download_models, what is wrong.

The workflow calls `plan_models` once when it parses the config. For each role (high, low, vae,
text_encoder, tokenizer): a safetensors file is read as it is; a `.pth` (told by its content when it
exists, by its suffix when it is still to be downloaded) is converted once by prepare_models to
`<prepared>/<file stem>.safetensors`. Existing files are recognised now (names/shapes only: cheap),
so a wrong file stops the run before any job starts, naming the file.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

from .formats import CheckpointError, ModelInfo, check_model_set, check_role, container_of, inspect_model
from .hub import KNOWN_SOURCES, HubFile, hub_files

NETWORK_ROLES = ("high", "low", "vae", "text_encoder")
PTH_SUFFIXES = (".pth", ".pt")


@dataclass
class ModelPlan:
    inputs: dict[str, str] = field(default_factory=dict)  # role -> the file a stage reads
    conversions: dict[str, tuple[str, str]] = field(default_factory=dict)  # prepared name -> (role, source)
    downloads: list[HubFile] = field(default_factory=list)  # configured downloads still missing
    problems: list[str] = field(default_factory=list)


def _needs_conversion(path: str) -> bool:
    if os.path.exists(path):
        return container_of(path) == "pth"
    return path.endswith(PTH_SUFFIXES)


def _up_to_date(target: str, source: str) -> bool:
    return os.path.exists(target) and os.path.getmtime(target) >= os.path.getmtime(source)


def plan_models(
    models: Mapping[str, str],
    prepared_dir: str,
    made_by_workflow: Mapping[str, str] | None = None,
    download: Mapping[str, Mapping[str, str]] | None = None,
    check: bool = True,
) -> ModelPlan:
    """Resolve the config's `models` (see the module docstring). `made_by_workflow`: role -> path that a
    rule of the workflow creates (the demo models), so it may be missing now. check=False skips
    recognising the files (a job's own parse of the workflow: the main process checked them)."""
    plan = ModelPlan()
    made = made_by_workflow or {}
    wanted = {f.role: f for f in hub_files(models, download or {})}
    plan.downloads = [f for f in wanted.values() if not os.path.exists(f.dest)]
    infos: dict[str, ModelInfo] = {}
    sources_by_name: dict[str, str] = {}
    for role in (*NETWORK_ROLES, "tokenizer"):
        path = models[role]
        exists = os.path.exists(path)
        if not exists and made.get(role) != path and role not in wanted:
            plan.problems.append(_missing(role, path))
            continue
        if role == "tokenizer":
            plan.inputs[role] = path
            continue
        try:
            convert = _needs_conversion(path)
        except CheckpointError as err:
            plan.problems.append(f"models.{role}: {err}")
            continue
        read = path
        if convert:
            name = Path(path).stem
            if sources_by_name.setdefault(name, path) != path:
                plan.problems.append(
                    f"models.{role}: {path} and {sources_by_name[name]} would both be prepared as "
                    f"{name}.safetensors; rename one of them"
                )
                continue
            read = f"{prepared_dir.rstrip('/')}/{name}.safetensors"
            plan.conversions[name] = (role, path)
        plan.inputs[role] = read
        if exists and check:  # check it now: the prepared copy when it is current (a header read), else the file
            checked = read if convert and _up_to_date(read, path) else path
            try:
                infos[role] = check_role(inspect_model(checked), role)
            except CheckpointError as err:
                plan.problems.append(f"models.{role}: {err}")
    plan.problems += check_model_set(infos)
    return plan


def _missing(role: str, path: str) -> str:
    message = f"models.{role}: {path} does not exist"
    repo = KNOWN_SOURCES.get(Path(path).name)
    if repo:
        message += (f" (fetch https://huggingface.co/{repo}/resolve/main/{Path(path).name}, or add "
                    f"download.{role}: {{repo: {repo}, file: {Path(path).name}, revision: <commit>}} to the config "
                    "and run `snakemake download_models`)")
    return message
