"""A prompt's key, and its text read back from the sheet by that key.

Rows with one prompt share one text embedding, filed under the prompt's key (a hash of its text),
so a changed prompt is a new file. The jobs that need the text (encode_prompt, the pictures) read
it from the sheet by key: the sheet's free text never travels as a job parameter (parameters are
shown in reports and logs), and a job needs no file of its own written first.
"""

from __future__ import annotations

import hashlib
import os


def prompt_key(prompt: str) -> str:
    return hashlib.sha256(prompt.encode("utf-8")).hexdigest()[:16]


def read_prompt(sheet: str | os.PathLike, key: str) -> str:
    """The prompt of `sheet` whose key is `key`, read exactly as the workflow read the sheet."""
    from ..sheet import read_table  # (the sheet's reader uses this module's prompt_key)

    header, records = read_table(sheet)
    column = header.index("prompt") if "prompt" in header else None
    for _line, cells in records:
        if column is not None and column < len(cells) and prompt_key(cells[column]) == key:
            return cells[column]
    raise LookupError(f"{sheet}: no prompt has the key {key} any more (was the sheet edited during the run?)")
