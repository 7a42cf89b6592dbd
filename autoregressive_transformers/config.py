"""Model configurations of the pixel transformers and the paper's per-dataset presets.

The three models of a dataset share every field except ``attn``: KARM, ARM and LARM
differ only in their attention (docs/method.md). ``attn`` may also name any other causal
attention of the registry (``krause.nn.attention_names("causal")``).

``window``, ``top_k``, ``sigma`` and ``attn_impl`` are the fields of the embedded
``KrauseConfig`` (``ModelConfig.krause_config``; defaults ``KrauseConfig()``'s); a
dataset preset's ``krause`` entry overrides them by their KrauseConfig names.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from krause.nn import KrauseConfig, resolve_name
from krause.nn.config import config_from_fields

#: attention name -> model name used in the paper (other registry names are accepted too)
ATTENTIONS = {"krause": "KARM", "vanilla": "ARM", "linear": "LARM"}

#: KrauseConfig field -> ModelConfig field
KRAUSE_FIELDS = {"window": "window", "top_k": "top_k", "sigma": "sigma", "impl": "attn_impl"}

#: Paper presets. ``image_shape`` is (height, width, channels); a sequence is the image in
#: raster order with the channels of a pixel interleaved (R, G, B for CIFAR-10).
DATASETS = {
    "mnist": dict(
        image_shape=(28, 28, 1),
        model=dict(dim=256, num_layers=12, num_heads=8),
        krause=dict(window=128, top_k=96),
        batch_size=64,
    ),
    "cifar10": dict(
        image_shape=(32, 32, 3),
        model=dict(dim=512, num_layers=16, num_heads=8),
        krause=dict(window=256, top_k=192),
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
    window: int = KrauseConfig.window  # Krause: candidate window W (keys i-W < j <= i)
    top_k: int = KrauseConfig.top_k  # Krause: nearest candidates kept
    sigma: float = KrauseConfig.sigma  # Krause: initial sigma, one per head
    attn_impl: str = KrauseConfig.impl  # Krause: implementation of the op (krause.dispatch.IMPLS)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> "ModelConfig":
        if self.attn not in ATTENTIONS:
            resolve_name(self.attn, "causal", "attn")  # another registered name passes; else the list
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
        self.krause_config  # KrauseConfig's checks; an error names this config's field
        _check_int("window", self.window, 1, self.seq_len)
        _check_int("top_k", self.top_k, 1, self.window)
        return self

    @property
    def krause_config(self) -> KrauseConfig:
        """The attention settings as the registry reads them (checked by ``KrauseConfig``)."""
        return config_from_fields({k: getattr(self, v) for k, v in KRAUSE_FIELDS.items()}, KRAUSE_FIELDS)

    @property
    def name(self) -> str:
        """The paper's model name (KARM, ARM, LARM), else "ARM-<attention>"."""
        return ATTENTIONS.get(self.attn, f"ARM-{self.attn}")

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
    krause = KrauseConfig().replace(**preset["krause"]).to_dict()  # a misspelt field fails here, by its name
    fields = dict(preset["model"], attn=attn, seq_len=h * w * c)
    fields.update({KRAUSE_FIELDS[f]: krause[f] for f in preset["krause"]})
    fields.update({k: v for k, v in overrides.items() if v is not None})
    return ModelConfig(**fields)
