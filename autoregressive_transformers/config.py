"""Model configurations of the pixel transformers and the paper's per-dataset presets.

The three models of a dataset share every field except ``attn``: KARM, ARM and LARM
differ only in their attention (docs/method.md).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from krause.dispatch import IMPLS

#: attention name -> model name used in the paper
ATTENTIONS = {"krause": "KARM", "vanilla": "ARM", "linear": "LARM"}

#: Paper presets. ``image_shape`` is (height, width, channels); a sequence is the image in
#: raster order with the channels of a pixel interleaved (R, G, B for CIFAR-10).
DATASETS = {
    "mnist": dict(
        image_shape=(28, 28, 1),
        model=dict(dim=256, num_layers=12, num_heads=8, window=128, top_k=96),
        batch_size=64,
    ),
    "cifar10": dict(
        image_shape=(32, 32, 3),
        model=dict(dim=512, num_layers=16, num_heads=8, window=256, top_k=192),
        batch_size=8,
    ),
}


def _check_int(name: str, value, low: int, high: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an int, got {value!r}")
    if value < low or (high is not None and value > high):
        bound = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ValueError(f"{name} must be {bound}, got {value}")
    return value


@dataclass
class ModelConfig:
    """A pixel transformer: tokens 0..vocab_size-1 (256 intensities) in raster order, one
    start token before them so that the first pixel is modelled too, learned absolute
    positions, pre-LN blocks with a GELU MLP, an untied output head."""

    attn: str = "krause"
    seq_len: int = 784
    vocab_size: int = 256
    dim: int = 256
    num_layers: int = 12
    num_heads: int = 8
    mlp_ratio: float = 4.0
    dropout: float = 0.1
    window: int = 128  # Krause: candidate window W (keys i-W < j <= i)
    top_k: int = 96  # Krause: nearest candidates kept
    sigma: float = 2.5  # Krause: initial sigma, one per head
    attn_impl: str = "auto"  # Krause: implementation of the op (krause.dispatch.IMPLS)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> "ModelConfig":
        if self.attn not in ATTENTIONS:
            raise ValueError(f"attn must be one of {sorted(ATTENTIONS)}, got {self.attn!r}")
        _check_int("seq_len", self.seq_len, 1)
        _check_int("vocab_size", self.vocab_size, 2)
        _check_int("dim", self.dim, 1)
        _check_int("num_layers", self.num_layers, 1)
        _check_int("num_heads", self.num_heads, 1)
        if self.dim % self.num_heads:
            raise ValueError(f"num_heads must divide dim, got dim {self.dim} and num_heads {self.num_heads}")
        if not (isinstance(self.mlp_ratio, (int, float)) and self.mlp_ratio > 0):
            raise ValueError(f"mlp_ratio must be > 0, got {self.mlp_ratio!r}")
        if not (isinstance(self.dropout, (int, float)) and 0.0 <= self.dropout < 1.0):
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}")
        _check_int("window", self.window, 1, self.seq_len)
        _check_int("top_k", self.top_k, 1, self.window)
        if not (isinstance(self.sigma, (int, float)) and math.isfinite(self.sigma) and self.sigma > 0):
            raise ValueError(f"sigma must be a finite number > 0, got {self.sigma!r}")
        if self.attn_impl not in IMPLS:
            raise ValueError(f"attn_impl must be one of {IMPLS}, got {self.attn_impl!r}")
        return self

    @property
    def name(self) -> str:
        return ATTENTIONS[self.attn]

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @property
    def hidden_dim(self) -> int:
        return int(round(self.dim * self.mlp_ratio))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"model config has unknown fields {unknown}")
        return cls(**d)


def model_config(dataset: str, attn: str = "krause", **overrides) -> ModelConfig:
    """The paper's model for ``dataset`` with ``attn``; keyword arguments override fields
    (``None`` values are ignored, so argparse defaults can be passed straight through)."""
    if dataset not in DATASETS:
        raise ValueError(f"dataset must be one of {sorted(DATASETS)}, got {dataset!r}")
    preset = DATASETS[dataset]
    h, w, c = preset["image_shape"]
    fields = dict(preset["model"], attn=attn, seq_len=h * w * c)
    fields.update({k: v for k, v in overrides.items() if v is not None})
    return ModelConfig(**fields)
