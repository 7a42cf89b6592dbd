"""Attention-sink analysis: per layer, the mean attention weight that queries 1..T-1 put on token 0.

    python -m lora_llms.sinks analyze --model /models/Meta-Llama-3-8B --data_dir /data/flan_v2 \\
        --label base --out_dir results/sinks
    python -m lora_llms.sinks analyze --model ... --adapter runs/krause/adapter --label krause --out_dir ...
    python -m lora_llms.sinks plot results/sinks/base.json results/sinks/krause.json --out sinks.png

For every layer and each of ``--num_texts`` FLAN eval texts (one at a time, at most
``--max_length`` tokens) it averages ``A[h, i, 0]`` over heads h and queries i = 1..T-1,
for three weight matrices separately:

- ``standard``: the pretrained (softmax) branch, from the eager attention weights;
- ``krause``: the Krause branch's top-k window weights (dense, for analysis);
- ``effective``: the gated mix's weights ``g0_i A_std + g1_i A_krause`` (the gate is per
  token, so this is the attention the mixed output effectively applies before o_proj).

An unpatched model has only ``standard``; a Krause-only model (mix="krause") only
``krause`` (= its effective weights). Layers above 0.05 are flagged, as in the paper's
analysis (Llama3-8B: mean 0.707 for the baseline, 0.364 for Krause).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from krause.dispatch import IMPLS
from krause.training.entry import entry_point
from krause.training.errors import UsageError
from krause.training.ranges import POSITIVE_INT, SEED, Range, check_namespace
from krause.training.run_dir import atomic_write_text
from lora_llms import cli

BRANCHES = ("standard", "krause", "effective")
FLAG_THRESHOLD = 0.05


def _token0_share(weights: torch.Tensor) -> float:
    """Mean over batch, heads and queries 1.. of the weight on key 0 of (B, H, Tq, Tk) weights."""
    return float(weights[:, :, 1:, 0].float().mean())


def _layer_values(attn, kwargs, output) -> dict[str, float]:
    """The three token-0 shares of one attention module's call (hook inputs and output)."""
    from krause.dense import causal_candidates
    from krause.hf.patch import KrauseAttentionMixin
    from krause.nn import gate_weights, krause_attention_probs

    if attn.__dict__.get("krause_window") is not None:  # attn_implementation="krause": output[1] is Krause's
        share = _token0_share(output[1])
        return {"krause": share, "effective": share}
    if not isinstance(attn, KrauseAttentionMixin):
        weights = output[1]
        if weights is None:
            raise ValueError("model: no attention weights returned; load it with attn_implementation='eager'")
        return {"standard": _token0_share(weights)}
    hidden = kwargs["hidden_states"]
    position_embeddings = kwargs["position_embeddings"]
    cfg = attn.krause_config
    length = hidden.shape[1]
    _, (q, k, log_sigma, _) = attn.krause_branch(hidden, position_embeddings, None, None, return_probs=True)
    candidates = causal_candidates(length, length, cfg.window, device=q.device)
    krause_weights = krause_attention_probs(q, k, log_sigma, candidates, cfg.top_k)
    values = {"krause": _token0_share(krause_weights)}
    std_weights = output[1]
    if std_weights is None:
        raise ValueError("model: no attention weights returned; load it with attn_implementation='eager'")
    out_std, _ = super(KrauseAttentionMixin, attn).forward(
        hidden_states=hidden, position_embeddings=position_embeddings,
        attention_mask=kwargs.get("attention_mask"), past_key_values=None,
    )
    out_krause = attn.krause_branch(hidden, position_embeddings, None, None)
    gate = gate_weights(out_std, out_krause, attn.krause_gate)
    g0 = gate[..., 0][:, None, 1:]  # (B, 1, T-1): per query, shared by the heads
    g1 = gate[..., 1][:, None, 1:]
    effective = g0 * std_weights[:, :, 1:, 0].float() + g1 * krause_weights[:, :, 1:, 0]
    values["standard"] = _token0_share(std_weights)
    values["effective"] = float(effective.mean())
    return values


def attention_modules(model) -> list[torch.nn.Module]:
    layers = model.get_decoder().layers if hasattr(model, "get_decoder") else model.model.layers
    return [layer.self_attn for layer in layers]


@torch.no_grad()
def sink_values(model, tokenizer, texts, max_length: int = 2048) -> dict:
    """{"standard"/"krause"/"effective": per-layer mean token-0 share (or None), "num_texts": n}."""
    modules = attention_modules(model)
    sums = {b: [0.0] * len(modules) for b in BRANCHES}
    seen = {b: 0 for b in BRANCHES}
    current: list[dict] = [{} for _ in modules]

    def make_hook(i):
        def hook(module, args, kwargs, output):
            current[i] = _layer_values(module, kwargs, output)
        return hook

    handles = [m.register_forward_hook(make_hook(i), with_kwargs=True) for i, m in enumerate(modules)]
    for m in modules:
        m.krause_return_weights = True  # dense weights from attn_implementation="krause" layers
    device = next(model.parameters()).device
    used = 0
    try:
        for text in texts:
            ids = tokenizer(text, return_tensors="pt", truncation=True, max_length=max_length)["input_ids"]
            if ids.shape[1] < 2:
                continue
            model(input_ids=ids.to(device), use_cache=False, output_attentions=True)
            used += 1
            for i, values in enumerate(current):
                for branch, value in values.items():
                    sums[branch][i] += value
            for branch in BRANCHES:
                seen[branch] += branch in current[0]
    finally:
        for h in handles:
            h.remove()
        for m in modules:
            del m.krause_return_weights
    if used == 0:
        raise ValueError("texts: none has at least 2 tokens")
    result = {"num_texts": used, "max_length": max_length, "num_layers": len(modules)}
    for branch in BRANCHES:
        per_layer = [s / used for s in sums[branch]] if seen[branch] else None
        result[branch] = per_layer
        result[f"{branch}_mean"] = sum(per_layer) / len(per_layer) if per_layer else None
        result[f"{branch}_flagged_layers"] = (
            [i for i, v in enumerate(per_layer) if v > FLAG_THRESHOLD] if per_layer else None)
    return result


def headline(result: dict) -> tuple[str, list[float]]:
    """The branch that describes the model's own attention: effective if mixed, else the only one."""
    for branch in ("effective", "standard", "krause"):
        if result.get(branch):
            return branch, result[branch]
    raise ValueError("result has no per-layer values")


def plot(result_paths, out_path) -> Path:
    """Per-layer token-0 share of each result (its effective weights), with the overall mean in the legend."""
    from krause.training.plotting import plot_series

    records_by_layer: dict[int, dict] = {}
    keys = []
    for path in result_paths:
        result = json.loads(Path(path).read_text())
        branch, values = headline(result)
        label = result.get("label", Path(path).stem)
        weights = {"effective": "mixed weights", "standard": "softmax weights", "krause": "Krause weights"}[branch]
        key = f"{label}: {weights}, mean {sum(values) / len(values):.3f}"
        keys.append(key)
        for layer, value in enumerate(values):
            records_by_layer.setdefault(layer, {"layer": layer})[key] = value
    records = [records_by_layer[i] for i in sorted(records_by_layer)]
    return plot_series(records, out_path, keys=keys, x="layer", title="attention on token 0 (queries 1..T-1)",
                       ylabel="mean weight on token 0")


def _analyze(args) -> int:
    from lora_llms.data import eval_texts
    from lora_llms.evaluate import check_model_inputs, load_for_eval

    device = check_model_inputs(args.model, args.adapter, args.device, args.impl, args.dtype)
    texts = eval_texts(args.data_dir, args.num_texts, seed=args.shuffle_seed)  # a data problem: before loading
    model, tokenizer, kind = load_for_eval(args.model, args.adapter, args.dtype, "eager", device, args.impl,
                                           verify=False)  # check_model_inputs verified it
    if len(texts) < args.num_texts:
        print(f"note: the eval split has {len(texts)} usable texts; --num_texts {args.num_texts} uses those {len(texts)}")
    result = {"label": args.label or kind, "kind": kind, "model": args.model, "adapter": args.adapter,
              **sink_values(model, tokenizer, texts, args.max_length)}
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{result['label']}.json"
    atomic_write_text(path, json.dumps(result, indent=2) + "\n")
    branch, values = headline(result)
    print(f"{result['label']}: {branch} mean {sum(values) / len(values):.4f} over {result['num_layers']} layers, "
          f"{result['num_texts']} texts -> {path}")
    return 0


def parse_args(argv=None):
    p = cli.parser("lora_llms.sinks", "attention-sink analysis (token-0 attention per layer)")
    sub = p.add_subparsers(dest="command", required=True)
    a = sub.add_parser("analyze", help="per-layer token-0 attention of one model")
    a.add_argument("--model", required=True)
    a.add_argument("--adapter", default=None)
    a.add_argument("--data_dir", required=True, help="FLAN files; the eval split's texts are used")
    a.add_argument("--num_texts", type=POSITIVE_INT, default=500)
    a.add_argument("--max_length", type=Range(int, ge=2), default=2048, help="tokens per text (>= 2: a query after token 0)")
    a.add_argument("--shuffle_seed", type=SEED, default=3407)
    a.add_argument("--label", default=None)
    a.add_argument("--dtype", choices=cli.DTYPES, default="bfloat16")
    a.add_argument("--impl", choices=IMPLS, default=None,
                   help="run the Krause op with this implementation (default: the one the adapter was saved with)")
    a.add_argument("--device", default=None)
    a.add_argument("--out_dir", required=True)
    g = sub.add_parser("plot", help="baseline vs Krause figure from analyze results")
    g.add_argument("results", nargs="+")
    g.add_argument("--out", required=True)
    args = p.parse_args(argv)
    return check_namespace(args, a) if args.command == "analyze" else args


@entry_point
def main(argv=None) -> int:
    args = parse_args(argv)
    if args.command == "plot":
        missing = [r for r in args.results if not Path(r).is_file()]
        if missing:
            raise UsageError(f"results: no such file(s) {missing}")
        print(plot(args.results, args.out))
        return 0
    return _analyze(args)


if __name__ == "__main__":
    sys.exit(main())
