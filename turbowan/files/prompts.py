"""A prompt's key, and its text read back from the sheet by that key.

Rows with one prompt share one text embedding, filed under the prompt's key (a hash of its text),
so a changed prompt is a new file. The jobs that need the text (encode_prompt, the pictures) read
it from the sheet by key: the sheet's free text never travels as a job parameter (parameters are
shown in reports and logs), and a job needs no file of its own written first.
"""

from __future__ import annotations

import hashlib
import os

import pandas as pd


def prompt_key(prompt: str) -> str:
    return hashlib.sha256(prompt.encode("utf-8")).hexdigest()[:16]


def read_prompt(sheet: str | os.PathLike, key: str) -> str:
    """The prompt of `sheet` whose key is `key` (read as turbowan.sheet reads the sheet)."""
    table = pd.read_csv(sheet, dtype=str, keep_default_na=False, encoding="utf-8-sig")
    table.columns = [c.strip() for c in table.columns]
    for prompt in table.get("prompt", []):
        if prompt_key(prompt) == key:
            return prompt
    raise LookupError(f"{sheet}: no prompt has the key {key} any more (was the sheet edited during the run?)")
