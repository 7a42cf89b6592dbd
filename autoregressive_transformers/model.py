"""The pixel transformer (docs/method.md): KARM, ARM and LARM are this model with the
attention set to krause, vanilla or linear; nothing else differs. Every attention comes
from the registry (``krause.nn.build_attention``).

Sequence layout. The model reads ``[START, x_0, ..., x_{T-2}]`` and predicts
``x_0, ..., x_{T-1}``: a dedicated start token (id ``vocab_size``) makes the first pixel
a modelled prediction like every other, so sampling starts from the start token alone
and never seeds a pixel with noise.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from transformers.cache_utils import Cache

from krause.cache import install_layers
from krause.nn import build_attention

from .config import ModelConfig


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int, dropout: float):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x):
        return self.drop(self.fc2(F.gelu(self.fc1(x))))


class Block(nn.Module):
    """Pre-LN transformer block: x + attn(LN(x)), then x + MLP(LN(x))."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.dim)
        self.attn = build_attention(cfg.attn, cfg.dim, cfg.num_heads, krause=cfg.krause_config, proj_drop=cfg.dropout)
        self.ln2 = nn.LayerNorm(cfg.dim)
        self.mlp = MLP(cfg.dim, cfg.hidden_dim, cfg.dropout)

    def forward(self, x, cache=None):
        x = x + self.attn(self.ln1(x), cache)
        return x + self.mlp(self.ln2(x))


class DecodeState(Cache):
    """The decoding cache of one batch: a ``transformers.Cache`` holding one layer of the decoding-cache
    contract per block (``krause.cache``'s Krause window and KV layers; linear attention's recurrent
    state, a transformers linear-attention layer), filled by ``krause.cache.install_layers``, plus the
    position of the next token."""

    def __init__(self, batch_size: int):
        super().__init__(layers=[])
        self.rows = batch_size
        self.pos = 0

    @property
    def batch_size(self) -> int:
        return self.rows

    @property
    def caches(self) -> list:
        return self.layers

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        self.rows = len(indices)

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        self.rows *= repeats

    @property
    def nbytes(self) -> int:
        return sum(layer.nbytes for layer in self.layers)


class PixelTransformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.start_token = cfg.vocab_size
        self.tok_emb = nn.Embedding(cfg.vocab_size + 1, cfg.dim)
        self.pos_emb = nn.Parameter(torch.zeros(1, cfg.seq_len, cfg.dim))
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.num_layers))
        self.ln_f = nn.LayerNorm(cfg.dim)
        self.head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """GPT-2 style: N(0, 0.02) weights, zero biases, residual output projections scaled
        by 1/sqrt(2 * layers). The same for every attention, so models differ only in it;
        ``log_sigma`` keeps its module init (log of the configured sigma)."""
        residual_std = 0.02 / math.sqrt(2 * self.cfg.num_layers)
        for name, m in self.named_modules():
            if isinstance(m, nn.Linear):
                std = residual_std if name.endswith(("attn.o_proj", "mlp.fc2")) else 0.02
                nn.init.normal_(m.weight, std=std)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Embedding):
                nn.init.normal_(m.weight, std=0.02)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.pos_emb, std=0.02)

    # ------------------------------------------------------------------ training
    def inputs_for(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, T) pixels -> (B, T) input ids [START, x_0, ..., x_{T-2}]."""
        start = torch.full_like(pixels[:, :1], self.start_token)
        return torch.cat([start, pixels[:, :-1]], dim=1)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, T) pixel values (any int dtype, 0..vocab_size-1) -> (B, T, vocab) logits;
        position t predicts pixel t from pixels < t."""
        if pixels.dim() != 2 or pixels.shape[1] != self.cfg.seq_len:
            raise ValueError(f"pixels must have shape (batch, {self.cfg.seq_len}), got {tuple(pixels.shape)}")
        return self._run(self.inputs_for(pixels.long()), 0, None)

    def _run(self, ids: torch.Tensor, pos: int, caches) -> torch.Tensor:
        t = ids.shape[1]
        if pos + t > self.cfg.seq_len:
            raise ValueError(f"positions {pos}..{pos + t - 1} exceed seq_len {self.cfg.seq_len}")
        x = self.drop(self.tok_emb(ids) + self.pos_emb[:, pos:pos + t])
        for i, block in enumerate(self.blocks):
            x = block(x, None if caches is None else caches[i])
        return self.head(self.ln_f(x))

    def nll(self, pixels: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        """Negative log-likelihood in nats: mean per dimension, or per dimension (B, T) with
        reduction='none'. Computed in fp32 whatever the autocast dtype."""
        logits = self(pixels)
        return F.cross_entropy(logits.float().transpose(1, 2), pixels.long(), reduction=reduction)

    # ------------------------------------------------------------------ decoding
    def new_state(self, batch_size: int, device=None, dtype=None) -> DecodeState:
        """Empty decoding caches: Krause windows (W keys/values per layer), softmax KV
        caches, or linear-attention recurrent states."""
        device = device if device is not None else self.pos_emb.device
        # The sequence length is known: growing caches are sized once (CIFAR-10's 3,072
        # tokens would otherwise double 256 -> 4096 slots); windows and states ignore it.
        state = DecodeState(batch_size)
        install_layers(state, lambda: [blk.attn.new_cache(batch_size, device=device, dtype=dtype,
                                                          capacity=self.cfg.seq_len) for blk in self.blocks])
        return state

    @torch.no_grad()
    def decode(self, ids: torch.Tensor, state: DecodeState) -> torch.Tensor:
        """Feeds the next input ids (B, L) (the first call starts with the start token) and
        returns their (B, L, vocab) logits, equal to the full forward's at those positions."""
        if ids.shape[0] != state.batch_size:
            raise ValueError(f"ids batch size {ids.shape[0]} does not match the state's {state.batch_size}")
        logits = self._run(ids, state.pos, state.caches)
        state.pos += ids.shape[1]
        return logits

    @torch.no_grad()
    def prefill(self, prefix: torch.Tensor, state: DecodeState) -> torch.Tensor:
        """Starts ``state`` with the start token followed by ``prefix`` (B, P) pixels in one
        pass; returns the logits of pixel P (B, vocab)."""
        ids = torch.cat([torch.full_like(prefix[:, :1], self.start_token), prefix], dim=1).long()
        return self.decode(ids, state)[:, -1]

    @torch.no_grad()
    def sample(self, batch_size: int = 1, temperature: float = 1.0, prefix: torch.Tensor | None = None,
               generator: torch.Generator | None = None, dtype=None, progress=None,
               stats: dict | None = None) -> torch.Tensor:
        """Samples whole images (B, T) (int64) with the decoding caches.

        ``prefix`` (B, P): pixels given (completion); the rest is sampled (``first_pixel="uniform"``:
        without a prefix the first pixel is drawn uniformly, as the first release did). ``temperature``
        0 takes the most likely value. ``progress`` is an optional callable(n_tokens_done).
        ``stats``, a dict, receives the largest decoding-cache size seen as "cache_bytes".
        """
        if not (isinstance(temperature, (int, float)) and temperature >= 0):
            raise ValueError(f"temperature must be >= 0, got {temperature!r}")
        device = self.pos_emb.device
        t_total = self.cfg.seq_len
        if prefix is not None:
            batch_size, p = prefix.shape
            if not 0 < p < t_total:
                raise ValueError(f"prefix length must be in [1, {t_total - 1}], got {p}")
        if prefix is None and self.cfg.first_pixel == "uniform":  # the first release: a uniform first pixel
            prefix = torch.randint(0, self.cfg.vocab_size, (batch_size, 1), device=device, generator=generator)
        state = self.new_state(batch_size, device, dtype)
        out = torch.empty(batch_size, t_total, dtype=torch.long, device=device)
        if prefix is None:
            p = 0
            logits = self.decode(torch.full((batch_size, 1), self.start_token, device=device), state)[:, -1]
        else:
            p = prefix.shape[1]
            out[:, :p] = prefix.to(device)
            logits = self.prefill(out[:, :p], state)
        for t in range(p, t_total):
            nxt = _sample_logits(logits, temperature, generator)
            out[:, t] = nxt
            if progress is not None:
                progress(t + 1)
            if t + 1 < t_total:
                logits = self.decode(nxt[:, None], state)[:, -1]
        if stats is not None:
            stats["cache_bytes"] = max(stats.get("cache_bytes", 0), state.nbytes)
        return out


def _sample_logits(logits: torch.Tensor, temperature: float, generator) -> torch.Tensor:
    if temperature == 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


def bits_per_dim(nll_nats_sum: float, num_dims: int) -> float:
    """Bits per dimension from a summed NLL in nats over ``num_dims`` values."""
    return nll_nats_sum / (num_dims * math.log(2.0))
