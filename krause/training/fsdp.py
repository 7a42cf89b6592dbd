"""FSDP2 from outside the model (torchtitan's split): the caller names the blocks.

    mesh = init_device_mesh(env.device.type, (env.world_size,))
    apply_fsdp(model, mesh, blocks="blocks", mp_policy=mixed_precision("bf16"),
               activation_checkpointing=True, compile_blocks=False)

Each block (a module of the ModuleList / Sequential at each `blocks` path; "*" matches
any index, e.g. "layers.*.blocks" for Swin stages) is optionally wrapped with activation
checkpointing and compiled (`Module.compile`, per block: the same code for every layer),
then `fully_shard`-ed; the root module is sharded last (embeddings, head, norms). The
model class holds no parallelism code. Under FSDP2 `krause.training.Checkpointer` keeps
the state sharded (DTensor shards per rank) and reshards on load; gradient
accumulation toggles `set_requires_gradient_sync` (accumulation.py).
"""

from __future__ import annotations

from typing import Iterable, Sequence

import torch
import torch.nn as nn

__all__ = ["apply_fsdp", "find_blocks", "mixed_precision", "build_mesh"]

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def mixed_precision(param_dtype: str | torch.dtype | None = "bf16", reduce_dtype: str | torch.dtype | None = "fp32"):
    """A `MixedPrecisionPolicy`: parameters cast to `param_dtype` for compute, gradients reduced in `reduce_dtype`."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    def dtype(x):
        if x is None or isinstance(x, torch.dtype):
            return x
        if x not in _DTYPES:
            raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {x!r}")
        return _DTYPES[x]

    return MixedPrecisionPolicy(param_dtype=dtype(param_dtype), reduce_dtype=dtype(reduce_dtype))


def build_mesh(device_type: str, world_size: int | None = None):
    """A 1-D data-parallel DeviceMesh over every rank."""
    from torch.distributed.device_mesh import init_device_mesh

    from .distributed import get_world_size

    return init_device_mesh(device_type, (world_size or get_world_size(),), mesh_dim_names=("dp",))


def _get(root: nn.Module, path: Sequence[str]) -> list[nn.Module]:
    mods = [root]
    for part in path:
        nxt = []
        for m in mods:
            if part == "*":
                nxt.extend(m.children())
            else:
                if not hasattr(m, part):
                    raise ValueError(f"{type(m).__name__} has no submodule {part!r}")
                nxt.append(getattr(m, part))
        mods = nxt
    return mods


def find_blocks(model: nn.Module, blocks: str | Iterable[str]) -> list[tuple[nn.Module, str, nn.Module]]:
    """(container, name in container, block) for every block under the given container paths."""
    paths = [blocks] if isinstance(blocks, str) else list(blocks)
    found = []
    for path in paths:
        containers = _get(model, path.split(".")) if path else [model]
        for container in containers:
            if not isinstance(container, (nn.ModuleList, nn.Sequential, nn.ModuleDict)):
                raise ValueError(f"blocks path {path!r} must name a ModuleList / Sequential / ModuleDict, "
                                 f"got {type(container).__name__}")
            found.extend((container, name, child) for name, child in container.named_children())
    if not found:
        raise ValueError(f"no blocks found at {paths}")
    return found


def apply_fsdp(model: nn.Module, mesh=None, *, blocks: str | Iterable[str] = "blocks", mp_policy=None,
               reshard_after_forward: bool = True, activation_checkpointing: bool = False,
               compile_blocks: bool = False, compile_kwargs: dict | None = None) -> nn.Module:
    """Shard `model` in place with FSDP2, block by block, then the root; returns the model.

    mesh: a DeviceMesh (None: the default 1-D mesh over the world).
    blocks: dotted path(s) of the block containers ("blocks", "layers", "layers.*.blocks").
    mp_policy: a MixedPrecisionPolicy (see `mixed_precision`), None for full precision.
    activation_checkpointing: recompute each block's activations in backward.
    compile_blocks: `torch.compile` each block (after checkpoint wrapping, before sharding).
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    scalars = [n for n, p in model.named_parameters() if p.dim() == 0]
    if scalars:  # fully_shard refuses them deep inside; say which and what to do
        raise ValueError(f"FSDP2 cannot shard 0-d parameters ({', '.join(scalars[:4])}"
                         f"{' ...' if len(scalars) > 4 else ''}); give them shape (1,) in the model")
    mp_policy = mp_policy or MixedPrecisionPolicy()
    kwargs = dict(mp_policy=mp_policy)
    if mesh is not None:
        kwargs["mesh"] = mesh
    found = find_blocks(model, blocks)
    for container, name, block in found:
        if activation_checkpointing:
            from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

            block = checkpoint_wrapper(block, preserve_rng_state=True)
            container.register_module(name, block)
        if compile_blocks:
            block.compile(**(compile_kwargs or {}))
        fully_shard(block, reshard_after_forward=reshard_after_forward, **kwargs)
    # the root: last block's parameters are needed right away in backward, so no reshard
    fully_shard(model, reshard_after_forward=False if len(found) else reshard_after_forward, **kwargs)
    return model
