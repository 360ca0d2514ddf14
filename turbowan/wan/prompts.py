"""A prompt as umT5 reads it, without torch: the cleaning, and how many tokens it makes.

umT5 reads at most TEXT_LEN tokens (EOS included); the rest of a longer prompt is cut. The workflow
counts before any job runs, so a user learns it then, not from a log line hours later.
"""

from __future__ import annotations

import html
import re
from pathlib import Path
from typing import Mapping

import ftfy

TEXT_LEN = 512


def clean_prompt(text: str) -> str:
    """The official 'whitespace' cleaning: ftfy, html-unescape twice, collapse whitespace."""
    text = ftfy.fix_text(text)
    text = html.unescape(html.unescape(text)).strip()
    return re.sub(r"\s+", " ", text).strip()


def token_counts(prompts: Mapping[str, str], tokenizer_dir: str | Path) -> dict[str, int]:
    """{key: tokens of the cleaned prompt, EOS included, not cut} with the tokenizer's tokenizer.json
    (the `tokenizers` library: no transformers import); {} when the folder has none yet."""
    path = Path(tokenizer_dir) / "tokenizer.json"
    if not path.is_file():
        return {}
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(path))
    tokenizer.no_truncation()
    tokenizer.no_padding()
    return {key: len(tokenizer.encode(clean_prompt(text)).ids) for key, text in prompts.items()}
