"""TurboWan batch: TurboDiffusion's Wan2.2 image-to-video, one stage at a time."""

__version__ = "0.1.0"
