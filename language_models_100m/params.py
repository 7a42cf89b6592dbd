"""Exact parameter counts of every preset x attention kind (tied embeddings counted once).

    python -m language_models_100m.params [--vocab_size 50257] [--markdown]

Models are built on the meta device, so nothing is allocated.
"""

from __future__ import annotations

import torch

from krause.training.entry import OneLineParser, entry_point
from krause.training.ranges import POSITIVE_INT, check_namespace

from .model import ATTENTIONS
from .presets import PRESETS, build_model


def count_parameters(config: str, attention: str, vocab_size: int = 50257) -> dict[str, int]:
    with torch.device("meta"):
        model = build_model(config, attention, vocab_size=vocab_size)
    total = sum(p.numel() for p in model.parameters())
    embedding = model.transformer.wte.weight.numel() + model.transformer.wpe.weight.numel()
    return {"total": total, "non_embedding": total - embedding}


@entry_point
def main(argv=None) -> int:
    parser = OneLineParser(prog="python -m language_models_100m.params", description=__doc__.split("\n")[0])
    parser.add_argument("--vocab_size", type=POSITIVE_INT, default=50257, help="GPT-2's vocabulary by default")
    parser.add_argument("--presets", nargs="+", default=["100m", "200m"], choices=sorted(PRESETS))
    args = check_namespace(parser.parse_args(argv), parser)
    print("| config | attention | parameters | non-embedding |")
    print("|---|---|---:|---:|")
    for preset in args.presets:
        for attention in ATTENTIONS:
            n = count_parameters(preset, attention, args.vocab_size)
            print(f"| {preset} | {attention} | {n['total']:,} | {n['non_embedding']:,} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
