"""GPT-2-style decoder language models whose attention is one of five kinds.

Pre-LN blocks (LayerNorm -> attention -> residual, LayerNorm -> GELU MLP -> residual),
learned absolute positions, token embeddings tied to the output head, dropout on the
embeddings and on each residual branch. Only the attention differs between kinds:

    gated           standard causal softmax + causal-window Krause branch, gated per token
    krause          causal-window Krause attention alone
    standard        causal softmax over the whole prefix (SDPA)
    sliding_window  causal softmax over the last ``window`` tokens
    topk            causal softmax over the ``top_k`` highest-scoring earlier tokens

Attention dropout is 0 for every kind (the Krause op never forms its weights, so it has
none to drop; the baselines go without it too so that they differ in attention alone).

The model is a transformers ``PreTrainedModel`` with ``GenerationMixin``: generate()
fills its transformers ``Cache`` with the layers of ``krause.cache`` (Krause and
sliding-window layers keep only the last ``window`` keys/values, the standard and top-k
layers a growing cache, gated layers both), so beam search, ``crop`` and left-padded
batches work: each row of a left-padded batch decodes as it would alone (positions count
its real tokens only; padding is never attended).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from huggingface_hub.dataclasses import strict
from torch import nn
from transformers import GenerationMixin, PreTrainedConfig, PreTrainedModel
from transformers import initialization as init
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_outputs import CausalLMOutputWithPast

from krause import causal_krause_attention
from krause.cache import GatedCacheLayer, KrauseWindowLayer, KVCacheLayer, SlidingWindowLayer, install_layers
from krause.nn import gated_mix, init_gate, topk_causal_attention

ATTENTIONS = ("gated", "krause", "standard", "sliding_window", "topk")


@strict
class KrauseLMConfig(PreTrainedConfig):
    """Hyper-parameters of a Krause language model (``model_type`` "krause_lm").

    Defaults are the "100m" preset with gated attention. ``attn_window``, ``attn_top_k`` and
    ``sigma`` configure the Krause branch and the sliding-window / top-k baselines
    (the window for sliding_window, top_k for topk; named so that generate() does not read
    them as sampling settings); ``gate_init`` is the initial weight of
    the standard branch in the gated mix.
    """

    model_type = "krause_lm"
    keys_to_ignore_at_inference = ["past_key_values"]
    attribute_map = {
        "hidden_size": "n_embd",
        "max_position_embeddings": "n_positions",
        "num_attention_heads": "n_head",
        "num_hidden_layers": "n_layer",
    }

    vocab_size: int = 50257
    n_positions: int = 1024
    n_embd: int = 768
    n_layer: int = 8
    n_head: int = 12
    n_inner: int = 2048
    attention: str = "gated"
    attn_window: int = 32
    attn_top_k: int = 16
    sigma: float | int = 2.5
    gate_init: float = 0.8
    dropout: float | int = 0.1
    layer_norm_epsilon: float = 1e-5
    initializer_range: float = 0.02
    krause_impl: str = "auto"
    use_cache: bool = True
    bos_token_id: int | None = 50256
    eos_token_id: int | list[int] | None = 50256
    pad_token_id: int | None = None
    tie_word_embeddings: bool = True

    def validate_architecture(self):
        """Part of ``@strict`` validation: one line naming the bad field."""
        if self.attention not in ATTENTIONS:
            raise ValueError(f"attention must be one of {list(ATTENTIONS)}, got {self.attention!r}")
        for name in ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head", "n_inner", "attn_window",
                     "attn_top_k"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_head: n_embd {self.n_embd} is not divisible by n_head {self.n_head}")
        if not (self.sigma > 0 and math.isfinite(self.sigma)):
            raise ValueError(f"sigma must be a finite number > 0, got {self.sigma!r}")
        if not 0.0 < self.gate_init < 1.0:
            raise ValueError(f"gate_init must be in (0, 1), got {self.gate_init!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}")
        from krause.dispatch import IMPLS

        if self.krause_impl not in IMPLS:
            raise ValueError(f"krause_impl must be one of {list(IMPLS)}, got {self.krause_impl!r}")


class _Projections(nn.Module):
    """q/k/v/o projections of one attention branch (names as in Hugging Face decoders)."""

    def __init__(self, config: KrauseLMConfig):
        super().__init__()
        d = config.n_embd
        self.num_heads, self.head_dim = config.n_head, d // config.n_head
        self.q_proj = nn.Linear(d, d)
        self.k_proj = nn.Linear(d, d)
        self.v_proj = nn.Linear(d, d)
        self.o_proj = nn.Linear(d, d)
        self.o_proj.is_residual = True  # GPT-2's scaled init of the projections into the residual stream

    def project(self, x):
        b, t, _ = x.shape
        shape = (b, t, self.num_heads, self.head_dim)
        return tuple(p(x).view(shape).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))

    def merge(self, out):
        b, _, t, _ = out.shape
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1))


class SoftmaxBranch(_Projections):
    """Causal softmax attention: full prefix ("standard"), a window, or the top-k scores."""

    def __init__(self, config: KrauseLMConfig, kind: str):
        super().__init__(config)
        self.kind, self.window, self.top_k = kind, config.attn_window, config.attn_top_k

    def forward(self, x, cache=None, key_padding_mask=None):
        q, k, v = self.project(x)
        if self.kind == "topk":
            if cache is not None:
                k, v, key_padding_mask = cache.append(k, v, key_padding_mask)
            return self.merge(topk_causal_attention(q, k, v, self.top_k, key_padding_mask=key_padding_mask))
        if cache is not None:
            return self.merge(cache.attend(q, k, v, key_padding_mask=key_padding_mask))
        if self.kind == "standard":
            return self.merge(F.scaled_dot_product_attention(q, k, v, is_causal=True))
        pos = torch.arange(q.shape[2], device=q.device)
        band = (pos[None, :] <= pos[:, None]) & (pos[None, :] > pos[:, None] - self.window)
        return self.merge(F.scaled_dot_product_attention(q, k, v, attn_mask=band))

    def new_cache(self):
        return SlidingWindowLayer(self.window) if self.kind == "sliding_window" else KVCacheLayer()


class KrauseBranch(_Projections):
    """Causal-window Krause attention with one learnable sigma per head (``log_sigma``)."""

    def __init__(self, config: KrauseLMConfig):
        super().__init__(config)
        self.window, self.top_k, self.impl = config.attn_window, config.attn_top_k, config.krause_impl
        self.log_sigma = nn.Parameter(torch.full((config.n_head,), math.log(config.sigma)))

    def forward(self, x, cache=None, key_padding_mask=None):
        q, k, v = self.project(x)
        if cache is not None:
            return self.merge(cache.attend(q, k, v, self.log_sigma, key_padding_mask=key_padding_mask))
        return self.merge(causal_krause_attention(q, k, v, self.log_sigma, self.window, self.top_k, impl=self.impl))

    def new_cache(self):
        return KrauseWindowLayer(self.window, self.top_k, self.impl)


class GatedAttention(nn.Module):
    """The paper's gated mix: ``standard`` and ``krause`` branches, ``gate`` = Linear(2d, 2)."""

    def __init__(self, config: KrauseLMConfig):
        super().__init__()
        self.standard = SoftmaxBranch(config, "standard")
        self.krause = KrauseBranch(config)
        self.gate = nn.Linear(2 * config.n_embd, 2)
        self.gate.is_gate = True
        init_gate(self.gate, config.gate_init)

    def forward(self, x, cache=None, key_padding_mask=None):
        std_cache, krause_cache = (cache.standard, cache.krause) if cache is not None else (None, None)
        return gated_mix(self.standard(x, std_cache, key_padding_mask), self.krause(x, krause_cache, key_padding_mask),
                         self.gate)

    def new_cache(self):
        return GatedCacheLayer(self.standard.new_cache(), self.krause.new_cache())


def build_attention(config: KrauseLMConfig) -> nn.Module:
    if config.attention == "gated":
        return GatedAttention(config)
    if config.attention == "krause":
        return KrauseBranch(config)
    return SoftmaxBranch(config, config.attention)


class MLP(nn.Module):
    def __init__(self, config: KrauseLMConfig):
        super().__init__()
        self.fc = nn.Linear(config.n_embd, config.n_inner)
        self.proj = nn.Linear(config.n_inner, config.n_embd)
        self.proj.is_residual = True

    def forward(self, x):
        return self.proj(F.gelu(self.fc(x)))


class Block(nn.Module):
    def __init__(self, config: KrauseLMConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.attn = build_attention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.mlp = MLP(config)
        self.drop = nn.Dropout(config.dropout)

    def forward(self, x, cache=None, key_padding_mask=None):
        x = x + self.drop(self.attn(self.ln_1(x), cache, key_padding_mask))
        return x + self.drop(self.mlp(self.ln_2(x)))


class KrauseLMPreTrainedModel(PreTrainedModel):
    config_class = KrauseLMConfig
    config: KrauseLMConfig
    base_model_prefix = "transformer"
    _no_split_modules = ["Block"]
    _skip_keys_device_placement = ["past_key_values"]
    supports_gradient_checkpointing = False

    @torch.no_grad()
    def _init_weights(self, module):
        """GPT-2 init: N(0, 0.02), residual output projections scaled by 1/sqrt(2 n_layer);
        the gate as ``krause.nn.init_gate``; log_sigma = log(sigma)."""
        std = self.config.initializer_range
        if isinstance(module, nn.Linear) and getattr(module, "is_gate", False):
            if not getattr(module.weight, "_is_hf_initialized", False):  # (not over loaded weights)
                init_gate(module, self.config.gate_init)
        elif isinstance(module, nn.Linear):
            scale = 1 / math.sqrt(2 * self.config.n_layer) if getattr(module, "is_residual", False) else 1.0
            init.normal_(module.weight, mean=0.0, std=std * scale)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, nn.LayerNorm):
            init.ones_(module.weight)
            init.zeros_(module.bias)
        elif isinstance(module, KrauseBranch):
            init.constant_(module.log_sigma, math.log(self.config.sigma))


class KrauseLMModel(KrauseLMPreTrainedModel):
    """Embeddings, blocks and the final LayerNorm; returns hidden states."""

    def __init__(self, config: KrauseLMConfig):
        super().__init__(config)
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.n_positions, config.n_embd)
        self.drop = nn.Dropout(config.dropout)
        self.h = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.post_init()

    def get_input_embeddings(self):
        return self.wte

    def set_input_embeddings(self, value):
        self.wte = value

    def new_cache_layers(self) -> list:
        """One ``krause.cache`` layer per block: what a transformers ``Cache`` is filled with."""
        return [block.attn.new_cache() for block in self.h]

    def forward(self, input_ids, past_key_values: Cache | None = None, attention_mask=None):
        b, t = input_ids.shape
        layers, start = None, 0
        if past_key_values is not None:
            layers = install_layers(past_key_values, self.new_cache_layers)
            start = past_key_values.get_seq_length()
        if start + t > self.config.n_positions:
            raise ValueError(f"input_ids: positions {start}..{start + t - 1} exceed the model's "
                             f"n_positions={self.config.n_positions}")
        if attention_mask is None and layers is not None and any(layer.has_padding for layer in layers):
            raise ValueError("attention_mask is required: the cache holds padded rows, whose positions it sets")
        valid, pos = _padding_and_positions(attention_mask, b, start, t, input_ids.device, cached=layers is not None)
        if valid is not None and layers is None:
            layers = self.new_cache_layers()  # padding a real token would see: the cached path masks it
        x = self.drop(self.wte(input_ids) + self.wpe(pos))
        for i, block in enumerate(self.h):
            x = block(x, layers[i] if layers is not None else None, valid)
        return self.ln_f(x)


def _padding_and_positions(attention_mask, batch: int, past: int, length: int, device, cached: bool):
    """The (B, T) validity of the new tokens (None: no padding to mask) and their positions.

    ``attention_mask`` covers every token so far (B, past + T), 1 = real, as generate()
    passes it. A row's real tokens take positions 0, 1, ... whatever padding precedes
    them, so a left-padded row decodes as it would alone. Right padding without a cache
    needs no mask: a causal model's real tokens never see it.
    """
    positions = torch.arange(past, past + length, device=device)
    if attention_mask is None:
        return None, positions
    if not isinstance(attention_mask, torch.Tensor) or tuple(attention_mask.shape) != (batch, past + length):
        got = tuple(attention_mask.shape) if isinstance(attention_mask, torch.Tensor) else type(attention_mask).__name__
        raise ValueError(f"attention_mask must have shape ({batch}, {past + length}) (one column per token so far, "
                         f"1 = real token), got {got}")
    mask = attention_mask.to(device).bool()
    if bool(mask.all()):
        return None, positions
    if not cached and bool((mask.int().diff(dim=-1) <= 0).all()):  # ones then zeros: right padding
        return None, positions
    real_before = mask.long().cumsum(-1) - 1
    return mask[:, past:], real_before[:, past:].clamp_min(0)


class KrauseLMForCausalLM(KrauseLMPreTrainedModel, GenerationMixin):
    """Causal LM head (tied to the token embeddings) over ``KrauseLMModel``.

    ``forward(input_ids, labels=None, past_key_values=None, use_cache=None,
    attention_mask=None)``: labels are shifted inside (HF convention, -100 ignored).
    ``attention_mask`` (B, past + T) marks padding anywhere (left-padded prompts for
    batched generation included); ``past_key_values`` is any transformers ``Cache``, filled
    with ``krause.cache`` layers on first use (a fresh ``DynamicCache`` when none is given).
    """

    _tied_weights_keys = {"lm_head.weight": "transformer.wte.weight"}

    def __init__(self, config: KrauseLMConfig):
        super().__init__(config)
        self.transformer = KrauseLMModel(config)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.post_init()

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    def no_weight_decay(self) -> set[str]:
        """Names exempt from weight decay (with biases, norms and log_sigma): the embeddings."""
        return {"wte", "wpe"}

    def forward(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        past_key_values: Cache | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int = 0,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        if input_ids is None:
            raise ValueError("input_ids is required (inputs_embeds are not supported)")
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if not use_cache:
            past_key_values = None
        elif past_key_values is None and not self.training:
            past_key_values = DynamicCache()
        hidden = self.transformer(input_ids, past_key_values, attention_mask)
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        logits = self.lm_head(hidden)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits, past_key_values=past_key_values)

