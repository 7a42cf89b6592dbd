"""GPT-2-style decoder language models whose attention is one of the registry's kinds.

Pre-LN blocks (LayerNorm -> attention -> residual, LayerNorm -> GELU MLP -> residual),
learned absolute positions, token embeddings tied to the output head, dropout on the
embeddings and on each residual branch. Only the attention differs between kinds; every
one is built by ``krause.nn.build_attention`` (the one registry; no attention math here):

    gated           standard causal softmax + causal-window Krause branch, gated per token
    krause          causal-window Krause attention alone
    standard        causal softmax over the whole prefix (the registry's "softmax")
    sliding_window  causal softmax over the last ``window`` tokens
    topk            causal softmax over the ``top_k`` highest-scoring earlier tokens
    longformer      causal softmax over the last ``window`` tokens and the first ``global_tokens``
    routing         causal softmax within online k-means clusters of queries and keys (Roy et al.)

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

from krause.nn import CausalKrauseAttention, KrauseConfig, attention_names, build_attention, init_gate
from krause.nn import resolve_name
from krause.nn.config import config_from_fields
from krause.cache import install_layers

#: The family's names (CLI ``--attention``): the registry's causal attentions, softmax under its name here.
FIRST_FIVE = ("gated", "krause", "standard", "sliding_window", "topk")
#: ``linear`` stays the pixel models' baseline: its recurrent state has no transformers cache layer yet.
ATTENTIONS = FIRST_FIVE + tuple(n for n in attention_names("causal") if n not in FIRST_FIVE + ("softmax", "linear"))

#: The family's Krause settings: KrauseConfig's defaults but the paper's window 32 / top-k 16.
KRAUSE_PRESET = KrauseConfig().replace(window=32, top_k=16)

#: KrauseConfig field -> KrauseLMConfig field (flat, named so that generate() does not read
#: them as sampling settings).
KRAUSE_FIELDS = {"window": "attn_window", "top_k": "attn_top_k", "sigma": "sigma", "impl": "krause_impl",
                 "global_tokens": "attn_global_tokens", "num_clusters": "attn_num_clusters"}


@strict
class KrauseLMConfig(PreTrainedConfig):
    """Hyper-parameters of a Krause language model (``model_type`` "krause_lm").

    Defaults are the "100m" preset with gated attention. ``attn_window``, ``attn_top_k``,
    ``sigma``, ``krause_impl``, ``attn_global_tokens`` and ``attn_num_clusters`` are the
    fields of the embedded ``KrauseConfig`` (``krause_config``; defaults ``KRAUSE_PRESET``),
    read by the Krause branch and the baselines (``KRAUSE_FIELDS`` maps the names);
    ``gate_init`` is the initial weight of the standard branch in the gated mix.
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
    attn_window: int = KRAUSE_PRESET.window
    attn_top_k: int = KRAUSE_PRESET.top_k
    sigma: float | int = KRAUSE_PRESET.sigma
    gate_init: float = 0.8
    dropout: float | int = 0.1
    layer_norm_epsilon: float = 1e-5
    initializer_range: float = 0.02
    krause_impl: str = KRAUSE_PRESET.impl
    attn_global_tokens: int = KRAUSE_PRESET.global_tokens
    attn_num_clusters: int = KRAUSE_PRESET.num_clusters
    use_cache: bool = True
    bos_token_id: int | None = 50256
    eos_token_id: int | list[int] | None = 50256
    pad_token_id: int | None = None
    tie_word_embeddings: bool = True

    @property
    def krause_config(self) -> KrauseConfig:
        """The attention settings as the registry reads them (checked by ``KrauseConfig``)."""
        return config_from_fields({k: getattr(self, v) for k, v in KRAUSE_FIELDS.items()}, KRAUSE_FIELDS)

    def validate_architecture(self):
        """Part of ``@strict`` validation: one line naming the bad field."""
        if self.attention not in ATTENTIONS:
            name = resolve_name(self.attention, "causal")  # a registry name ("softmax") passes; else the list
            if name not in {resolve_name(a, "causal") for a in ATTENTIONS}:
                raise ValueError(f"attention {self.attention!r} is not one of this family's: {', '.join(ATTENTIONS)} "
                                 "(its recurrent state has no decoding cache layer here)")
        for name in ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head", "n_inner"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_head: n_embd {self.n_embd} is not divisible by n_head {self.n_head}")
        self.krause_config  # KrauseConfig's checks; an error names this config's field
        for name, used_by in (("attn_global_tokens", "longformer"), ("attn_num_clusters", "routing")):
            if self.attention == used_by and getattr(self, name) > self.n_positions:
                raise ValueError(f"{name} {getattr(self, name)} is more than the {self.n_positions} tokens of a "
                                 f"block (n_positions)")
        if not 0.0 < self.gate_init < 1.0:
            raise ValueError(f"gate_init must be in (0, 1), got {self.gate_init!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}")


def block_attention(config: KrauseLMConfig) -> nn.Module:
    """The attention of one block, from the registry, with the marks ``_init_weights`` reads."""
    name = resolve_name(config.attention, "causal")
    extra = dict(gate_init=config.gate_init) if name == "gated" else {}
    attn = build_attention(name, config.n_embd, config.n_head, krause=config.krause_config, **extra)
    for path, module in attn.named_modules():
        if path.endswith("o_proj"):
            module.is_residual = True  # GPT-2's scaled init of the projections into the residual stream
        if path == "gate":
            module.is_gate = True
    return attn


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
        self.attn = block_attention(config)
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
        elif isinstance(module, CausalKrauseAttention):
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

