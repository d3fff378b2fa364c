"""Shared test set-up: a persistent XLA compilation cache for the whole suite.

Many tests build `jax.jit(lambda ...)` afresh or run the launcher in a subprocess, which re-traces and re-compiles
programs whose HLO another test (or the other pytest-xdist worker) already compiled. JAX's persistent cache keys
each executable by its HLO, compile options and jax/jaxlib version, so a hit is the same program; it only skips
XLA's compile step (tracing still runs). The directory is kept between local runs (`ASOFTMAX_TEST_JAX_CACHE` to
move it; delete it at will); a fresh clone starts empty. Child processes inherit it through the environment.
"""

from __future__ import annotations

import json
import os
import tempfile

import jax
import numpy as np
import pytest


def _default_xla_flag(name: str, value: str) -> None:
  """Appends `--name=value` to XLA_FLAGS (read when the CPU backend starts; subprocesses inherit it) unless the
  user's XLA_FLAGS already sets `name`."""
  flags = os.environ.get("XLA_FLAGS", "")
  if name not in flags:
    os.environ["XLA_FLAGS"] = f"{flags} --{name}={value}".strip()


# XLA:CPU's LLVM optimization level 0 for the suite: its programs are compile-bound (small shapes, many distinct
# static configurations), and level 0 cuts compile CPU by about a quarter (tests/adaptive/test_core_jit.py:
# 34 s -> 26 s user); HLO-level passes (fusion, buffer assignment) are unchanged. Benchmarks do not use it.
_default_xla_flag("xla_backend_optimization_level", "0")
# XLA:CPU's older (non-MLIR) fusion emitters: about half the compile CPU of the suite's programs (test_bad_input.py
# cold 93 -> 50 s user; four AdaptiveSoftmax programs 12.6 -> 5.8 s). Under it a certified AdaptiveSoftmax call once
# returned a wrong winner: not a miscompile but an exact arm's bounds rounded one ulp apart (fixed in
# `core._elimination_rule`); codegen-sensitive rounding like that is what running the suite under other flags finds.
_default_xla_flag("xla_cpu_use_fusion_emitters", "false")
# XLA:CPU splits each program's LLVM module into parts compiled on a thread pool; with two xdist workers on two
# cores there is no idle core to use, and the split only adds work. One part: tests/test_bad_input.py and
# tests/adaptive/test_core.py (-n 2, empty compile cache, measured twice each way) 193 / 183 s -> 160 / 154 s user,
# 124 / 117 s -> 105 / 102 s wall. Code generation is the same; only how it is divided among threads changes.
_default_xla_flag("xla_cpu_parallel_codegen_split_count", "1")

_CACHE = os.environ.setdefault(
    "ASOFTMAX_TEST_JAX_CACHE", os.path.join(tempfile.gettempdir(), f"asoftmax-jax-cache-{os.getuid()}"))
# Environment first, so that subprocesses started by tests (launcher, multi-device runs) use the same cache.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", _CACHE)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.3")
jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
jax.config.update("jax_persistent_cache_min_compile_time_secs",
                  float(os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"]))


# ------------------------------------------------------------------------------------------------ shared fixtures
def _random_params(seed=0, vocab=97, dim=48, layers=2, heads=6, kv=2, hidden=80):
  """A small random Llama (`asoftmax.models.llama.LlamaParams`) from numpy-drawn GGUF-named tensors."""
  from asoftmax.models import llama

  cfg = llama.LlamaConfig(vocab_size=vocab, dim=dim, n_layers=layers, n_heads=heads, n_kv_heads=kv,
                          hidden_dim=hidden, rope_theta=10000.0, norm_eps=1e-5)
  rng = np.random.default_rng(seed)
  hd = dim // heads
  t = {"token_embd.weight": rng.normal(size=(vocab, dim)), "output_norm.weight": 1 + 0.1 * rng.normal(size=dim)}
  for i in range(layers):
    t[f"blk.{i}.attn_norm.weight"] = 1 + 0.1 * rng.normal(size=dim)
    t[f"blk.{i}.ffn_norm.weight"] = 1 + 0.1 * rng.normal(size=dim)
    t[f"blk.{i}.attn_q.weight"] = rng.normal(size=(heads * hd, dim)) / np.sqrt(dim)
    t[f"blk.{i}.attn_k.weight"] = rng.normal(size=(kv * hd, dim)) / np.sqrt(dim)
    t[f"blk.{i}.attn_v.weight"] = rng.normal(size=(kv * hd, dim)) / np.sqrt(dim)
    t[f"blk.{i}.attn_output.weight"] = rng.normal(size=(dim, heads * hd)) / np.sqrt(dim)
    t[f"blk.{i}.ffn_gate.weight"] = rng.normal(size=(hidden, dim)) / np.sqrt(dim)
    t[f"blk.{i}.ffn_up.weight"] = rng.normal(size=(hidden, dim)) / np.sqrt(dim)
    t[f"blk.{i}.ffn_down.weight"] = rng.normal(size=(dim, hidden)) / np.sqrt(hidden)
  t = {k: v.astype(np.float32) for k, v in t.items()}
  return llama.params_from_tensors(t, cfg)


@pytest.fixture(scope="session")
def random_params():
  """`random_params(seed=0, vocab=97, dim=48, layers=2, heads=6, kv=2, hidden=80)`: a small random Llama."""
  return _random_params


def _smollm2_file_cache(path, read_gguf):
  """(tensors, metadata) of the SmolLM2 GGUF at `path`, every tensor, from the suite's cache directory.

  The first process to need it reads the file (`read_gguf`: ~11 s, 7 of them parsing the tokenizer metadata and 3
  dequantizing) and writes `tensors.npz` (float32, uncompressed) and `meta.pickle` beside the XLA cache; every
  later process (the other xdist worker, a launcher subprocess, the next local run) loads those in ~1 s. The key is
  the GGUF's size and mtime and a hash of `gguf_loader.py` (a change to the reader reads the file again); writes go
  through a temporary name and `os.replace`, so a reader never sees half a file. Arrays are read-only: one copy is
  shared by every caller in the process.
  """
  import hashlib
  import pickle

  from asoftmax.models import gguf_loader

  st = os.stat(path)
  with open(gguf_loader.__file__, "rb") as f:
    code = hashlib.sha1(f.read()).hexdigest()[:12]
  folder = os.path.join(_CACHE, f"smollm2-gguf-{st.st_size}-{st.st_mtime_ns}-{code}")
  t_file, m_file = os.path.join(folder, "tensors.npz"), os.path.join(folder, "meta.pickle")
  if os.path.exists(t_file) and os.path.exists(m_file):
    with np.load(t_file) as z:
      tensors = {k: z[k] for k in z.files}
    with open(m_file, "rb") as f:
      meta = pickle.load(f)
  else:
    tensors, meta = read_gguf(path)
    os.makedirs(folder, exist_ok=True)
    tmp = f"{t_file}.{os.getpid()}.tmp.npz"
    np.savez(tmp, **tensors)
    os.replace(tmp, t_file)
    with open(f"{m_file}.{os.getpid()}.tmp", "wb") as f:
      pickle.dump(meta, f)
    os.replace(f"{m_file}.{os.getpid()}.tmp", m_file)
  for a in tensors.values():
    a.setflags(write=False)
  return tensors, meta


@pytest.fixture(scope="session", autouse=True)
def _smollm2_read_once():
  """SmolLM2-135M's GGUF is read (metadata parsed, every tensor dequantized) once per suite, not once per test,
  `n_layers` or tokenizer that needs it (~11 s each): `gguf_loader.read_gguf` / `read_metadata` on that file are
  served from one in-process copy, itself loaded from the cache directory when another process already wrote it
  (`_smollm2_file_cache`); `llama.load_smollm2` is cached per `n_layers` (the params are immutable jax arrays).
  A `names` selection gets the same tensors and errors as the real reader: missing names raise its ValueError.
  Other GGUF files go to the real functions."""
  import functools

  from asoftmax.models import gguf_loader, llama

  originals = gguf_loader.read_gguf, gguf_loader.read_metadata, llama.load_smollm2
  read_gguf, read_metadata, _ = originals
  target = os.path.realpath(gguf_loader.smollm2_path()) if gguf_loader.smollm2_available() else None
  cached = functools.cache(lambda: _smollm2_file_cache(target, read_gguf))

  def is_target(path):
    return target is not None and isinstance(path, (str, os.PathLike)) and os.path.realpath(path) == target

  def read_gguf_cached(path, names=None):
    if not is_target(path):
      return read_gguf(path, names)
    tensors, meta = cached()
    return {n: tensors[n] for n in gguf_loader._select_names(list(tensors), names, path)}, dict(meta)

  def read_metadata_cached(path):
    return dict(cached()[1]) if is_target(path) else read_metadata(path)

  gguf_loader.read_gguf, gguf_loader.read_metadata = read_gguf_cached, read_metadata_cached
  llama.load_smollm2 = functools.cache(originals[2])
  yield
  gguf_loader.read_gguf, gguf_loader.read_metadata, llama.load_smollm2 = originals


# ------------------------------------------------------------------------------------------------ scheduling
# `make test` runs two xdist workers from one shared queue of work units, longest first (LPT), each worker taking
# the next unit when it is almost idle (`pytest_xdist_make_scheduler` below: xdist's loadscope scheduler with this
# suite's units). The order comes from the per-test wall-clock times of an earlier run in tests/durations.json
# (`make test-durations` rewrites it; it orders tests, it never changes what they check).
# A unit is a test module: its tests share compiled programs (jit caches are per process), module-scoped fixtures
# (the sharded subprocess, MiniLM's weights) and cached inputs (the heavy-tailed problems of
# tests/adaptive/test_core_certified.py), so one worker runs them all. Measured, empty compile cache, 2 workers:
# tests/test_bad_input.py 62 s CPU with its tests spread over both workers, 53 s in one; tests/adaptive 259 -> 245 s.
# PER_TEST modules (independent, long tests) are split into one unit per test. With the collection order and
# xdist's default `load` chunks, the smoke configs (~2 min of CPU) came last and one worker ran them alone for
# ~30 s at the end of the suite.
# (Not `--dist loadgroup`: its `xdist_group` marks are silently ignored under pytest 9.2, pytest-xdist#1386.)
PER_TEST = ("tests/test_smoke_configs.py",)
_DURATIONS = os.path.join(os.path.dirname(__file__), "durations.json")
_UNKNOWN_S = 0.5  # a test not in the file (new): placed among the short ones


def _unit(nodeid: str) -> str:
  module = nodeid.split("::")[0]
  return nodeid if module in PER_TEST else module


def pytest_addoption(parser):
  parser.addoption("--store-durations", action="store_true",
                   help=f"write each test's wall-clock time (setup + call + teardown) to {_DURATIONS}")


@pytest.hookimpl(optionalhook=True)  # an xdist hook: unknown under `-p no:xdist`
def pytest_xdist_make_scheduler(config, log):
  """xdist's loadscope scheduling with `_unit` as the scope, in collection order (longest unit first)."""
  if config.getvalue("dist") != "load":
    return None
  from xdist.scheduler import LoadScopeScheduling

  class UnitScheduling(LoadScopeScheduling):
    def _split_scope(self, nodeid):
      return _unit(nodeid)

  config.option.loadscopereorder = False  # keep `pytest_collection_modifyitems`'s order
  return UnitScheduling(config, log)


@pytest.hookimpl(trylast=True)  # after `-m` / `-k` deselection: orders what runs
def pytest_collection_modifyitems(session, config, items):
  """Orders the units longest first (tests/test_scheduling.py checks the units and the order)."""
  units, first = {}, {}
  for i, item in enumerate(items):
    u = _unit(item.nodeid)
    units.setdefault(u, []).append(item)
    first.setdefault(u, i)
  cost = unit_costs(items)
  items[:] = [it for u in sorted(units, key=lambda u: (-cost[u], first[u])) for it in units[u]]


def unit_costs(items) -> dict[str, float]:
  """{unit: summed seconds of its tests in tests/durations.json} (_UNKNOWN_S for a test not there, or no file)."""
  try:
    with open(_DURATIONS) as f:
      durations = json.load(f)
  except (OSError, ValueError):
    durations = {}
  cost = {}
  for it in items:
    u = _unit(it.nodeid)
    cost[u] = cost.get(u, 0.0) + durations.get(it.nodeid, _UNKNOWN_S)
  return cost


_measured = {}


def pytest_runtest_logreport(report):
  if report.when in ("setup", "call", "teardown"):
    _measured[report.nodeid] = _measured.get(report.nodeid, 0.0) + report.duration


def pytest_sessionfinish(session, exitstatus):
  if not session.config.getoption("store_durations") or hasattr(session.config, "workerinput"):
    return  # xdist workers report to the controller, which writes the file
  if exitstatus == pytest.ExitCode.INTERRUPTED or not _measured:
    return  # a failed test still measured its time; an interrupted run did not reach every test
  data = {k: round(v, 2) for k, v in sorted(_measured.items()) if v >= 0.05}
  tmp = f"{_DURATIONS}.{os.getpid()}.tmp"
  with open(tmp, "w") as f:
    json.dump(data, f, indent=0, sort_keys=True)
    f.write("\n")
  os.replace(tmp, _DURATIONS)
