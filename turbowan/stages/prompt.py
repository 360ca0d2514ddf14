"""encode_prompt: a prompt's text -> its umT5 embedding [1, 512, d_model] (shared by rows with that prompt)."""

from __future__ import annotations

import logging
import torch

from ..files.artifacts import save_artifact
from ..files.prompts import read_prompt
from ..progress import phase
from ..wan.devices import resolve_device
from ..wan.prompts import clean_prompt
from ..wan.text import TEXT_LEN, encode_text
from . import loading
from .context import StageContext

log = logging.getLogger(__name__)


def encode_prompt(sheet: str, prompt_key: str, text_encoder: str, tokenizer: str, out: str,
                  device: str = "auto", dtype: str = "bfloat16", *, ctx: StageContext | None = None) -> None:
    """The prompt is read from the sheet by its key (turbowan.files.prompts)."""
    ctx = StageContext() if ctx is None else ctx
    dev = resolve_device(device)
    prompt = read_prompt(sheet, prompt_key)
    encoder, tok = loading.text_encoder(ctx, text_encoder, tokenizer, dev, dtype)
    with phase("encode prompt"):
        emb, length = encode_text(encoder, tok, prompt, dev)
    log.info("prompt encoded: %d tokens (of %d), embedding %s", length, TEXT_LEN, list(emb.shape))
    tokens = len(tok(clean_prompt(prompt), truncation=False)["input_ids"])  # before umT5's cut
    if tokens > TEXT_LEN:
        log.warning("the prompt has %d tokens; umT5 reads the first %d, the rest is ignored", tokens, TEXT_LEN)
    ctx.check()
    params = {"text_len": TEXT_LEN, "dtype": dtype, "device_type": dev.type, "prompt_tokens": tokens}
    save_artifact(out, {"text": emb, "length": torch.tensor([length], dtype=torch.int64)}, stage="encode_prompt",
                  params={**params, "prompt_key": prompt_key},
                  inputs={"text_encoder": text_encoder, "tokenizer": tokenizer})
