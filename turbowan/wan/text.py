"""Prompt -> umT5 text embedding [1, 512, d_model] (docs/reference.md, "The text")."""

from __future__ import annotations

import torch

from .prompts import TEXT_LEN, clean_prompt


def tokenize(tokenizer, prompt: str) -> tuple[torch.Tensor, torch.Tensor]:
    """ids and attention mask, each [1, 512]; the tokenizer appends EOS and pads to 512."""
    batch = tokenizer(
        [clean_prompt(prompt)],
        padding="max_length",
        truncation=True,
        max_length=TEXT_LEN,
        add_special_tokens=True,
        return_attention_mask=True,
        return_tensors="pt",
    )
    return batch["input_ids"], batch["attention_mask"]


@torch.no_grad()
def encode_text(encoder, tokenizer, prompt: str, device: torch.device) -> tuple[torch.Tensor, int]:
    """([1, 512, d_model] bf16 with rows at and after the true length zeroed, true length)."""
    ids, mask = tokenize(tokenizer, prompt)
    ids, mask = ids.to(device), mask.to(device)
    hidden = encoder(input_ids=ids, attention_mask=mask).last_hidden_state
    length = int(mask.sum().item())
    hidden[:, length:] = 0
    return hidden.to(torch.bfloat16), length
