"""A prompt's text on disk: what encode_prompt and the pictures read instead of a job parameter."""

from __future__ import annotations

import os

from .artifacts import atomic_path


def write_prompt(path: str | os.PathLike, prompt: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(prompt, encoding="utf-8")
