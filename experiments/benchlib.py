"""The one writer of benchmark snapshots: every `scripts/bench_*.py` records its tables through it.

A benchmark is an experiment whose rows are wall-clock times, so it is saved the same way: one `results.json`
per run in a workdir (default `docs/results/bench_<name>`), written atomically, with the machine it ran on and
the exact command, and a `table.md` drawn from it. README.md and docs/*.md show its tables only through include
blocks (`<!-- table: docs/results/bench_<name> section=T -->`, see `experiments/report.py`), so no benchmark
number is typed by hand.

Schema (what `experiments.report.include_table` reads)::

    {"bench": "topk_decode", "device": "cpu:cpu", "device_count": 1, "jax_version": "0.10.2",
     "load_average": [before, after], "cpu_count": 2, "cpu_affinity": 1, "command": "python scripts/...",
     "date": "2026-12-06T13:40:00+00:00", "commit": "7ff677b...", "dirty": [],   # tracked code files changed
     "wall_s": 812.3,
     "tables": {"<table name>": {"columns": ["n", "dense_ms", ...], "rows": [{"n": 2048, ...}, ...]}},
     "notes": {"<name>": "text or value", ...}}

Table and column names hold no whitespace (an include's `section=`, `columns=` and `where=` options are
whitespace-separated); rows may carry extra keys that are not columns (e.g. every repetition's time).

Usage in a script::

    ap = argparse.ArgumentParser(...)
    benchlib.add_flags(ap, "topk_attention")        # --workdir (default docs/results/bench_topk_attention)
    args = ap.parse_args()
    run = benchlib.start("topk_attention")           # load average, command, device before timing anything
    ...
    benchlib.write(args.workdir, run, {"forward": benchlib.table(["method", "ms"], rows)}, notes={...})

>>> import tempfile
>>> run = start("demo", command="python demo.py")
>>> path = write(tempfile.mkdtemp(), run, {"t": table(["n", "ms"], [{"n": 1, "ms": 0.5}])})
>>> import json; res = json.load(open(path))
>>> res["bench"], res["tables"]["t"]["rows"], len(res["load_average"])
('demo', [{'n': 1, 'ms': 0.5}], 2)
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import subprocess
import sys
import time
from typing import Any, Mapping, Sequence

from asoftmax import results as results_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Tracked paths whose uncommitted changes make a run "dirty" (a snapshot must come from committed code).
CODE_PATHS = ("asoftmax", "experiments", "scripts", "configs")


def default_workdir(name: str) -> str:
  """`docs/results/bench_<name>`: where a benchmark's committed snapshot lives."""
  return os.path.join("docs", "results", f"bench_{name}")


def add_flags(parser: argparse.ArgumentParser, name: str, flag: str = "--workdir", default: str | None = "",
              note: str = "") -> None:
  """Adds the output-directory flag (`flag`, default `docs/results/bench_<name>`; pass `default=None` for a
  script that chooses its default itself, and say how in `note`)."""
  parser.add_argument(flag, default=default_workdir(name) if default == "" else default,
                      help=f"directory for results.json and table.md (default {default_workdir(name)}: the "
                           f"committed snapshot that README/docs tables include{note})")


def _git(*args: str) -> str | None:
  try:
    return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10,
                          check=True).stdout
  except (OSError, subprocess.SubprocessError):
    return None


def start(name: str, command: str | None = None) -> dict[str, Any]:
  """The run's header, taken before anything is timed: bench name, device, jax version, load average (start),
  CPU count and affinity, command line (default: this process's argv), UTC date, git commit and the tracked code
  files that differ from it (`dirty`; None outside a git checkout)."""
  import jax

  dev = jax.devices()[0]
  status = _git("status", "--porcelain", "--untracked-files=no", "--", *CODE_PATHS)
  return {
      "bench": name,
      "device": f"{dev.platform}:{getattr(dev, 'device_kind', '')}",
      "device_count": len(jax.devices()),
      "jax_version": jax.__version__,
      "load_average": [round(os.getloadavg()[0], 2)],
      "cpu_count": os.cpu_count(),
      "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
      "command": command if command is not None else shlex.join(["python", *sys.argv]),
      "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      "commit": (_git("rev-parse", "HEAD") or "").strip() or None,
      "dirty": None if status is None else [line[3:] for line in status.splitlines() if line.strip()],
      "_t0": time.perf_counter(),
  }


def table(columns: Sequence[str], rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
  """One table: its column order and its rows (dicts; keys outside `columns` are kept but not shown).

  Raises:
    ValueError: a column name with whitespace, no columns, or a row that is not a mapping.
  """
  columns = list(columns)
  if not columns:
    raise ValueError("table(columns=...): no columns")
  bad = [c for c in columns if not c or any(ch.isspace() for ch in c)]
  if bad:
    raise ValueError(f"table(columns=...): names must hold no whitespace (include options split on it): {bad}")
  if not all(isinstance(r, Mapping) for r in rows):
    raise ValueError("table(rows=...): every row must be a dict")
  return {"columns": columns, "rows": [dict(r) for r in rows]}


def write(workdir: str, run: Mapping[str, Any], tables: Mapping[str, Mapping[str, Any]],
          notes: Mapping[str, Any] | None = None, path: str | None = None) -> str:
  """Writes `workdir/results.json` (or `path`) atomically, with the load average at the end, and `table.md`
  beside it; returns the results path. Call it again after every row to keep partial results of a long run.

  Raises:
    ValueError: a table name with whitespace, or a table not built by `table`.
  """
  for name, t in tables.items():
    if not name or any(ch.isspace() for ch in name):
      raise ValueError(f"write(tables=...): table name {name!r} must hold no whitespace")
    if set(t) != {"columns", "rows"}:
      raise ValueError(f"write(tables=...): table {name!r} must be built by benchlib.table")
  res = {k: v for k, v in run.items() if not k.startswith("_")}
  res["load_average"] = [run["load_average"][0], round(os.getloadavg()[0], 2)]
  if "_t0" in run:
    res["wall_s"] = round(time.perf_counter() - run["_t0"], 1)
  res["tables"] = dict(tables)
  res["notes"] = dict(notes or {})
  path = path or os.path.join(workdir, "results.json")
  results_lib.write_json(path, res)
  if os.path.basename(path) == "results.json":
    with open(path) as f:
      results_lib.write_text(os.path.join(os.path.dirname(path), "table.md"), render_markdown(json.load(f)))
  return path


def render_markdown(res: Mapping[str, Any]) -> str:
  """The `table.md` of a benchmark results dict: header line, one section per table, notes."""
  from experiments import tables as tables_lib

  load = res.get("load_average") or []
  dirty = res.get("dirty")
  commit = (res.get("commit") or "?")[:10] + (" (with uncommitted changes to " + ", ".join(dirty) + ")"
                                              if dirty else "")
  lines = [f"# Benchmark `{res['bench']}`", "",
           f"`{res.get('command')}`", "",
           f"Device {res.get('device')} (x{res.get('device_count', 1)}), jax {res.get('jax_version')}, commit {commit}, "
           f"{res.get('date')}, wall-clock {res.get('wall_s', '–')} s, load average "
           + " → ".join(f"{x:g}" for x in load) + f" on {res.get('cpu_count')} CPUs"
           + (f" (affinity {res['cpu_affinity']})" if res.get("cpu_affinity") else "") + ".", ""]
  for name, t in res["tables"].items():
    lines += [f"## {name}", "", tables_lib.markdown_table(t["rows"], t["columns"])]
  notes = res.get("notes") or {}
  if notes:
    lines += ["## Notes", ""]
    lines += [f"- **{k}**: {v if isinstance(v, str) else tables_lib.format_value(v)}" for k, v in notes.items()]
    lines.append("")
  return "\n".join(lines)
