"""The pipeline's stages: one function per rule, each reading its row's artifacts and writing the next.

    encode_prompt   prompt.py        prompt text -> umT5 embedding
    encode_image    conditioning.py  first frame -> y (mask + image latent)
    sample_high     sampling.py      noise -> x after the high-noise steps (+ generator state)
    sample_low      sampling.py      -> final latent
    decode          decoding.py      latent -> PNG frames
    encode_video    video.py         frames -> mp4 (CPU, no torch)

The model stages take a StageContext first (models already loaded, cancellation); a worker holds
one for many jobs. MODEL_STAGES is the only list of what a worker will run for a job.
"""

from __future__ import annotations

import importlib
from typing import Callable

# stage name -> module (under turbowan.stages) that defines a function of that name
MODEL_STAGES = {
    "encode_prompt": "prompt",
    "encode_image": "conditioning",
    "sample_high": "sampling",
    "sample_low": "sampling",
    "decode": "decoding",
}


def model_stage(name: str) -> Callable[..., None]:
    """The function of a model stage; KeyError for any other name."""
    module = importlib.import_module(f"{__name__}.{MODEL_STAGES[name]}")
    return getattr(module, name)
