"""Pixel-level autoregressive image models (docs/recipes.md): KARM (Krause attention),
ARM (softmax attention) and LARM (linear attention), identical except for the attention.

Entry points (each ``python -m autoregressive_transformers.<name> --help``):
    train     one model per run, single process or torchrun/DDP
    generate  unconditional samples from a trained run (cached decoding)
    complete  image completion from a fraction of each test image, with the NLL of the rest
"""

from .config import ATTENTIONS, DATASETS, ModelConfig, model_config
from .data import image_shape, images_to_tokens, load_pixels, tokens_to_images
from .model import PixelTransformer

__all__ = [
    "ATTENTIONS",
    "DATASETS",
    "ModelConfig",
    "model_config",
    "PixelTransformer",
    "image_shape",
    "images_to_tokens",
    "tokens_to_images",
    "load_pixels",
]
