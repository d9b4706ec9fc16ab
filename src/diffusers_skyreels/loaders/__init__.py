"""Loaders: LoRA for the SkyReels V4 pipelines."""

from .lora_skyreels_v4 import SkyReelsV4LoraLoaderMixin

__all__ = ["SkyReelsV4LoraLoaderMixin"]
