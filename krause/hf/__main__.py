"""``python -m krause.hf seal ADAPTER_DIR``: writes the integrity record of an adapter saved before
``krause.hf.save`` sealed its output, so that ``krause.hf.load`` and the LoRA tools read it again.
Seal only files you trust: the record vouches for them as they are now."""

from __future__ import annotations

import sys

from ..training.entry import OneLineParser, entry_point


@entry_point
def main(argv=None) -> int:
    p = OneLineParser(prog="python -m krause.hf", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    seal = sub.add_parser("seal", help="seal an adapter folder (sizes and CRC-32s of its files)")
    seal.add_argument("adapter_dir")
    args = p.parse_args(argv)
    from pathlib import Path

    from ..training.checkpointer import seal_directory
    from .lora import read_krause_config

    folder = Path(args.adapter_dir)
    if not folder.is_dir():
        raise ValueError(f"adapter_dir: {folder} is not a directory")
    read_krause_config(folder)  # only krause.hf adapters
    print(f"sealed {seal_directory(folder)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
