"""Scale-out table (issue 29 item 6): the sharded methods on 1, 2, 4 and 8 devices, against one device.

Four tables, one row per device count S in `config.devices`: a `(S,)` mesh of the first S devices of the mesh the
launcher builds from `config.mesh` (a count above its size is a row marked not run; without a mesh, one device). On
one machine, start the launcher with `XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu`.

* `exact`: an LLM-like head (`adaptive.llm_head_problem`, `head` = (n, d), `queries` queries): per-device
  bytes of A, `sharded.softmax_topk` wall-clock, products per device, top-1 ids equal to one device's;
* `adaptive`: `sharded.adaptive_softmax` (certified, epsilon, delta) on that head: per-device bytes of the prepared
  matrix, wall-clock, success (top-1 = the exact one), certified fraction, products read by the busiest device;
* `rff`: a `classes`-class RF tree (D = `rff_features`): per-device tree bytes, sampling wall-clock, max |log q -
  one device's| of the draws, chi-square p-value of the draws against one device's q (64 contiguous cells, small
  ones pooled), max |sampled loss - one device's|;
* `cache`: a `cache_keys`-key causal cache, 64 decode queries, epsilon_attention: rows whose k differs from one device's
  `topk.threshold_topk_probs`, max |tv - one device's|, max tv, wall-clock.

Wall-clock: median of `repeats` calls after a warm-up call. Forced host devices share the CPU's cores: there the
wall-clock measures the overhead of the collectives, not a speed-up.
"""

from __future__ import annotations

import os
import time
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from scipy import stats

from asoftmax import rff, sharded, topk
from asoftmax.adaptive import llm_head_problem
from experiments import registry, tables
from experiments.adaptive.common import median_ms


class ExactRow(NamedTuple):
  workload: str | None = None
  devices: int | None = None
  mb_A_per_device: float | None = None
  products_per_device: int | None = None
  ms: float | None = None
  ids_equal_one_device: bool | None = None
  status: str | None = None


class AdaptiveRow(NamedTuple):
  workload: str | None = None
  devices: int | None = None
  mb_prepared_per_device: float | None = None
  products_busiest_device: float | None = None  # mean over queries
  products_total: float | None = None
  ms: float | None = None
  success: float | None = None
  certified: float | None = None
  status: str | None = None


class RFFRow(NamedTuple):
  workload: str | None = None
  devices: int | None = None
  mb_tree_per_device: float | None = None
  ms_sample: float | None = None
  max_abs_dlogq: float | None = None
  chi2_p: float | None = None
  max_abs_dloss: float | None = None
  status: str | None = None


class CacheRow(NamedTuple):
  workload: str | None = None
  devices: int | None = None
  mb_kv_per_device: float | None = None
  ms: float | None = None
  rows_k_differs: int | None = None
  max_abs_dtv: float | None = None
  max_tv: float | None = None
  status: str | None = None


EXACT = tables.Table("exact", ExactRow, title="Exact top-1, vocab-sharded head")
ADAPTIVE = tables.Table("adaptive", AdaptiveRow, title="AdaptiveSoftmax, vocab-sharded head (certified)")
RFF = tables.Table("rff", RFFRow, title="RF-softmax tree over class blocks")
CACHE = tables.Table("cache", CacheRow, title="Certified threshold attention, sequence-sharded cache")
MB = 1.0 / 2**20


def _not_run(table, workload, S, pool):
  return table.row(workload=workload, devices=S, status=f"not run: config.mesh has {len(pool)} device(s) "
                   "(e.g. --config.mesh.shape='(8,)' with XLA_FLAGS=--xla_force_host_platform_device_count=8)")


def _mesh(pool, S, name):
  """A (S,) mesh named `name` of the first S devices of the launcher's mesh."""
  return sharded.make_mesh((S,), (name,), devices=pool)


def head_problem(config):
  """(A, X) as host float32 arrays: the head generated once (`llm_head_problem`), its device copy dropped."""
  n, d = config.head
  A, X = llm_head_problem(jax.random.key(config.seed), n, d, config.queries)
  A_host = np.empty((n, d), np.float32)
  A_host[...] = A
  del A
  return A_host, np.asarray(X)


def head_rows(config, sizes, pool, with_adaptive=True):
  """The exact and AdaptiveSoftmax rows. Memory: one host copy of A (deleted once the sharded copy exists when
  `config.free_host_head`), the sharded copy (1/S per device), the prepared matrix (3 copies, 1/S per device)."""
  n, d = config.head
  w = f"head {n}x{d}, {config.queries} queries"
  A, X = head_problem(config)
  one = np.argmax(X @ A.T, axis=1)  # one device's top-1 (the exact logits, host float32 GEMM)
  rows = []
  for S in sizes:
    if S > len(pool):
      rows += [_not_run(EXACT, w, S, pool)] + ([_not_run(ADAPTIVE, w, S, pool)] if with_adaptive else [])
      continue
    mesh = _mesh(pool, S, "vocab")
    # A on the devices once (padded, split by rows), as the prepared matrix is: no host transfer in the timing.
    pad = -(-n // S) * S - n
    Ad = jax.device_put(np.pad(A, ((0, pad), (0, 0))) if pad else A,
                        jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("vocab", None)))
    if config.free_host_head and len(sizes) == 1:
      del A  # the sharded copy is the only one left
    Xd = jnp.asarray(X)
    ms = median_ms(lambda i: sharded.softmax_topk(Ad[:n] if pad else Ad, Xd, mesh, k=1,
                                                         check_finite=False).indices, config.repeats)
    ref = sharded.softmax_topk(Ad[:n] if pad else Ad, Xd, mesh, k=1, check_finite=False)  # finite by construction
    mb_a = Ad.addressable_shards[0].data.nbytes * MB
    rows.append(EXACT.row(workload=w, devices=S, mb_A_per_device=mb_a,
                          products_per_device=-(-n // S) * d * config.queries, ms=ms,
                          ids_equal_one_device=bool((np.asarray(ref.indices[:, 0]) == one).all())))
    if with_adaptive:
      prep = sharded.prepare_matrix(Ad[:n] if pad else Ad, mesh)
      del Ad
      call = lambda i: sharded.adaptive_softmax(jax.random.key(config.seed + 1 + i), prep, Xd, mesh, k=1,  # noqa
                                                epsilon=config.epsilon, delta=config.delta, exact_below=0)
      res = call(0)
      ms = median_ms(lambda i: call(i).indices, config.repeats)
      prep_bytes = sum(leaf.addressable_shards[0].data.nbytes for leaf in jax.tree.leaves(prep.prep))
      rows.append(ADAPTIVE.row(
          workload=w, devices=S, mb_prepared_per_device=prep_bytes * MB,
          products_busiest_device=float(np.mean(np.asarray(res.max_shard_samples))),
          products_total=float(np.mean(np.asarray(res.samples))), ms=ms,
          success=float(np.mean(np.asarray(res.indices[:, 0]) == one)),
          certified=float(np.mean(np.asarray(res.certified)))))
      del prep
    else:
      del Ad
  return rows


def rff_rows(config, sizes, pool):
  n, dim, D = config.classes, 32, config.rff_features
  w = f"{n} classes, D={D}, {config.draws} draws"
  C = rff.normalize(jax.random.normal(jax.random.key(config.seed), (n, dim)))
  W = rff.init_rff(jax.random.key(config.seed + 1), dim, D, 4.0)
  feats = rff.rff_features(C, W)
  h = rff.normalize(jax.random.normal(jax.random.key(config.seed + 2), (4, dim)))
  psi = rff.rff_features(h, W)
  lq1 = np.asarray(rff.tree_log_probs(psi, rff.build_tree(feats), 0.01)[0])  # one device's q (4, P)
  sampler = rff.rff_sampler(jax.random.key(config.seed + 1), D, 4.0)
  ids1, lqs1 = sampler.sample(sampler.init(C), jax.random.key(config.seed + 3), h, 16)
  tg = jnp.arange(4)
  loss1 = np.asarray(rff.sampled_softmax_loss(h, C, tg, ids1, lqs1, 5.0))
  rows = []
  for S in sizes:
    if S > len(pool):
      rows.append(_not_run(RFF, w, S, pool))
      continue
    mesh = _mesh(pool, S, "classes")
    tree = sharded.build_tree(feats, mesh)
    ms = median_ms(lambda i: sharded.tree_sample(jax.random.key(10 + i), psi, tree, config.draws, 0.01, mesh)[0],
                   config.repeats)
    ids, lq = (np.asarray(a) for a in sharded.tree_sample(jax.random.key(5), psi, tree, config.draws, 0.01, mesh))
    P = lq1.shape[1]
    cells = min(64, P)
    e = np.exp(lq1[0].astype(np.float64)).reshape(cells, -1).sum(1) * config.draws
    obs = np.bincount(ids[0] // (P // cells), minlength=cells)
    big = e >= 5
    obs, e = np.append(obs[big], obs[~big].sum()), np.append(e[big], e[~big].sum())
    obs, e = obs[e > 0], e[e > 0]
    loss = np.asarray(sharded.sampled_softmax_loss(h, C, tg, ids1, lqs1, 5.0, mesh))
    rows.append(RFF.row(workload=w, devices=S, mb_tree_per_device=tree.nodes.addressable_shards[0].data.nbytes * MB,
                        ms_sample=ms, max_abs_dlogq=float(np.max(np.abs(lq - np.take_along_axis(lq1, ids, 1)))),
                        chi2_p=float(stats.chisquare(obs, e * obs.sum() / e.sum()).pvalue),
                        max_abs_dloss=float(np.max(np.abs(loss - loss1)))))
  return rows


def cache_rows(config, sizes, pool):
  N, d, Q = config.cache_keys, 64, 64
  w = f"{N} keys, d={d}, {Q} causal queries, eps={config.epsilon_attention}"
  ks = jax.random.split(jax.random.key(config.seed), 3)
  K, V = jax.random.normal(ks[0], (N, d)), jax.random.normal(ks[1], (N, d))
  q = 2.0 * jax.random.normal(ks[2], (Q, d))
  qpos = jnp.arange(Q) + N - Q
  valid = jnp.arange(N)[None, :] <= qpos[:, None]
  _, k1, tv1 = topk.threshold_topk_probs((q @ K.T) / np.sqrt(d), valid, config.epsilon_attention)
  rows = []
  for S in sizes:
    if S > len(pool):
      rows.append(_not_run(CACHE, w, S, pool))
      continue
    mesh = _mesh(pool, S, "seq")
    f = lambda i: sharded.threshold_attention(q, K, V, config.epsilon_attention, mesh, q_positions=qpos)  # noqa
    ms = median_ms(lambda i: f(i).out, config.repeats)
    r = f(0)
    rows.append(CACHE.row(workload=w, devices=S, mb_kv_per_device=-(-N // S) * d * 4 * 2 * MB, ms=ms,
                          rows_k_differs=int(np.sum(np.asarray(r.k) != np.asarray(k1))),
                          max_abs_dtv=float(np.max(np.abs(np.asarray(r.tv) - np.asarray(tv1)))),
                          max_tv=float(np.max(np.asarray(r.tv)))))
  return rows


def run(config, workdir, rng, mesh=None) -> registry.Output:
  """`mesh`: the launcher's mesh of `config.mesh` (its devices are the pool; None: one device)."""
  del workdir, rng  # the workloads are seeded from config.seed
  t0, load0 = time.perf_counter(), os.getloadavg()[0]
  pool = list(jax.devices()[:1]) if mesh is None else list(mesh.devices.flat)
  rows = []
  if "cache" in config.workloads:
    rows += cache_rows(config, config.devices, pool)
  if "rff" in config.workloads:
    rows += rff_rows(config, config.devices, pool)
  if "head" in config.workloads:
    rows += head_rows(config, config.devices, pool, with_adaptive=config.adaptive)
  if not config.adaptive:
    rows.append(ADAPTIVE.row(status="not run: config.adaptive is False"))
  dev = jax.devices()[0]
  notes = {"devices": f"{dev.platform}:{getattr(dev, 'device_kind', '')} x{len(pool)} (config.mesh)",
           "jax": jax.__version__,
           "timing": f"median of {config.repeats} calls after a warm-up call (compile excluded)",
           "forced_host_devices": "forced host devices share the CPU cores: wall-clock is overhead, not speed-up",
           "seconds": time.perf_counter() - t0,
           "load_average": f"{load0:.1f} (start), {os.getloadavg()[0]:.1f} (end) on {os.cpu_count()} CPUs",
           "xla_flags": os.environ.get("XLA_FLAGS", "")}
  return registry.Output(rows=rows, notes=notes)


def readme(res: dict) -> list[tables.ReadmeRow]:
  """README row: on the largest device count, exact = one device's ids, AdaptiveSoftmax success, bytes of A."""
  ex = [r for r in res["rows"] if r.get("table") == "exact" and r.get("ms") is not None]
  ad = [r for r in res["rows"] if r.get("table") == "adaptive" and r.get("ms") is not None]
  if not ex:
    return []
  e = max(ex, key=lambda r: r["devices"])
  a = next((r for r in ad if r["devices"] == e["devices"]), None)
  cfg = res.get("config") or {}
  nq = cfg.get("queries")
  ours = (f"exact top-1 = one device's: **{'yes' if e['ids_equal_one_device'] else 'no'}**; A per device "
          f"{e['mb_A_per_device']:.1f} MB (1/{e['devices']})")
  if a is not None:
    ours += (f"; AdaptiveSoftmax (certified, ε = {cfg.get('epsilon')}, δ = {cfg.get('delta')}) success "
             f"**{a['success'] * nq:.0f}/{nq}**, certified {a['certified'] * nq:.0f}/{nq}, busiest device reads "
             f"{a['products_busiest_device']:.3g} products per query")
  n, d = cfg.get("head", (None, None))
  return [tables.ReadmeRow(f"Scale-out, beyond the papers: {n:,} x {d} head over {e['devices']} forced host devices, "
                           f"{nq} queries", ours, "– (issue 29 target: one device's top-k, success ≥ 1 − δ, "
                           "A per device ≈ 1/8)")]


EXPERIMENT = registry.Experiment(name="sharded_scaleout", run=run, tables=(EXACT, ADAPTIVE, RFF, CACHE),
                                 title="Scale-out: the sharded methods on 1, 2, 4 and 8 devices", mesh=True,
                                 readme=readme)
