"""Turns saved `results.json` files into `table.md`, PNG plots and README's results rows (no re-running).

    python -m experiments.report --workdir results/adaptive_synthetic     # redraw table.md and plots
    python -m experiments.report --readme                                 # rewrite README's results rows
    python -m experiments.report --readme --check                         # exit 1 if README is stale

README's rows live between the markers `<!-- results:begin -->` and `<!-- results:end -->`; each row comes from
one committed snapshot `docs/results/<name>/results.json` (listed in `README_SNAPSHOTS`) through its
experiment's `readme` function: one headline number per cell, a link to the config and to the table.

Every other result table in README.md and docs/*.md is an *include*: a block

    <!-- table: docs/results/<name> [section=TABLE] [columns=a,b,c] [where=col=value&col2=value] -->
    ...generated, never edited by hand...
    <!-- table:end -->

that `--readme` redraws from that snapshot's results.json (an experiment's rows, or a benchmark's
`{"bench": ..., "tables": {name: {"columns": [...], "rows": [...]}}}` written by `scripts/bench_*.py`), and that
`--readme --check` (and tests/experiments/test_report.py) reports when stale. `where` keeps rows whose formatted
cell equals the value; `columns` picks and orders columns (default: the table's own).
"""

from __future__ import annotations

import glob
import json
import os
import re
import sys

from absl import app, flags

from asoftmax import results as results_lib
from experiments import registry, tables

ROOT = registry.ROOT
README = os.path.join(ROOT, "README.md")
BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"

# (snapshot directory, config that reproduces it), in README order.
README_SNAPSHOTS = (
    ("docs/results/adaptive_synthetic", "configs/adaptive/synthetic.py"),  # --config.trials=20
    ("docs/results/adaptive_wallclock", "configs/adaptive/wallclock.py"),  # see the config's docstring for the flags
    ("docs/results/adaptive_families", "configs/adaptive/families.py"),
    ("docs/results/adaptive_mnist", "configs/adaptive/mnist.py"),
    ("docs/results/adaptive_eurosat", "configs/adaptive/eurosat.py"),
    ("docs/results/adaptive_llm_issue11", "configs/adaptive/llm.py"),
    ("docs/results/adaptive_llm_ptb", "configs/adaptive/llm.py"),  # :data=ptb, issue 11's protocol (table.md's config)
    ("docs/results/topk_synthetic", "configs/topk/synthetic.py"),
    ("docs/results/topk_bert", "configs/topk/bert.py"),
    ("docs/results/topk_decoder", "configs/topk/decoder.py"),
    ("docs/results/topk_decoder_sketch_n8192", "configs/topk/decoder_sketch.py"),  # :one_sketch,window=8192,...
    ("docs/results/topk_decoder_sketch_n2048", "configs/topk/decoder_sketch.py"),  # :window=2048,...
    ("docs/results/rf_lm", "configs/rff/lm.py"),
    ("docs/results/rf_lm_smollm2_plateau", "configs/rff/lm.py"),  # variant :plateau
    ("docs/results/rf_lm_smollm2_plateau_exact", "configs/rff/lm.py"),  # variant :plateau, samplers=(exact,)
    ("docs/results/rf_bias", "configs/rff/bias.py"),
    ("docs/results/rf_classification", "configs/rff/classification.py"),
    ("docs/results/rf_time_to_accuracy", "configs/rff/time_to_accuracy.py"),  # variant :n1e5, priors=('zipf',)
    ("docs/results/rf_time_to_accuracy_1e6", "configs/rff/time_to_accuracy.py"),  # variant :n1e6
    ("docs/results/sharded_head_target", "configs/sharded/scaleout.py"),  # variant :target (8 forced devices)
)


def experiment_tables(exp: registry.Experiment) -> tuple[tables.Table, ...]:
  """The experiment's declared tables (a legacy `columns` list is one table named after the experiment)."""
  if exp.tables:
    return tuple(exp.tables)
  from typing import NamedTuple

  legacy = NamedTuple(f"{exp.name}_row", [(c, object) for c in exp.columns])
  legacy.__new__.__defaults__ = (None,) * len(exp.columns)
  return (tables.Table(exp.name, legacy, hidden=("*",)),)


def _rows_of(res: dict, exp: registry.Experiment) -> list[dict]:
  if exp.tables:
    tables.validate(res["rows"], exp.tables)
    return res["rows"]
  return [{**r, "table": exp.name} for r in res["rows"]]


def render_table(res: dict, exp: registry.Experiment) -> str:
  """The table.md text for one saved results dict: one section per declared table."""
  rows = _rows_of(res, exp)
  lines = [f"# {exp.title or exp.name}", ""]
  wall = res.get("wall_s")
  lines.append(
      f"Config `{res.get('config_name')}`, seed {res.get('seed')}, device {res.get('device')}, "
      f"jax {res.get('jax_version')}, "
      + (f"mesh {res['mesh']['axis_sizes']} ({res['mesh']['devices']} device(s)), "
         if (res.get("mesh") or {}).get("axis_sizes") else "")
      + f"wall-clock {'–' if wall is None else f'{wall:.1f} s'}"
      + (f", load average {res['load_average'][0]:g} → {res['load_average'][1]:g} on {res.get('cpu_count')} CPUs"
         if res.get("load_average") else "") + ".")
  if res.get("provenance"):
    lines += ["", f"**Provenance:** {res['provenance']}"]
  lines.append("")
  specs = experiment_tables(exp)
  shown = [t for t in specs if any(r.get("table") == t.name for r in rows)]  # a section head only if several
  for t in shown:
    mine = [r for r in rows if r.get("table") == t.name]
    if len(shown) > 1 or t.title:
      lines += [f"## {t.title or t.name}", ""]
    lines.append(tables.markdown_table(mine, t.columns))
  notes = res.get("notes") or {}
  if notes:
    lines.append("## Notes")
    lines.append("")
    for k, v in notes.items():
      lines.append(f"- **{k}**: {v if isinstance(v, str) else tables.format_value(v)}")
    lines.append("")
  return "\n".join(lines)


def load(workdir: str) -> tuple[dict, registry.Experiment]:
  with open(os.path.join(workdir, "results.json")) as f:
    res = json.load(f)
  return res, registry.get(res["experiment"])


def write_reports(workdir: str) -> list[str]:
  """Writes table.md and plots for `workdir/results.json`; returns the paths written."""
  res, exp = load(workdir)
  written = []
  path = os.path.join(workdir, "table.md")
  results_lib.write_text(path, render_table(res, exp))
  written.append(path)
  if exp.plot is not None and not res.get("provenance"):  # reconstructed results hold no per-query data
    import matplotlib

    matplotlib.use("Agg")
    for stem, fig in exp.plot(res["rows"], res.get("notes") or {}).items():
      path = os.path.join(workdir, f"{stem}.png")
      tables.save_figure(fig, path)
      written.append(path)
  return written


# ------------------------------------------------------------------------------------------ README rows
def _link(path: str) -> str:
  return f"[`{path}`]({path})"


RECONSTRUCTED = "†"
STALE = "‡"
FOOTNOTES = {
    RECONSTRUCTED: f"{RECONSTRUCTED} results.json rebuilt from the committed table.md (`scripts/reconstruct_results.py`): "
                   "the run's own results.json was not kept; the numbers are that table's cells.\n",
    STALE: f"{STALE} the snapshot predates a later fix and was not re-run (see its table.md provenance line).\n"}


def _cell(s: str) -> str:
  return s.replace("|", "\\|")


def readme_rows(root: str = ROOT) -> str:
  """The markdown results table README shows, built only from the committed snapshots."""
  lines = ["| paper table | config | our number | paper number | table |", "|---|---|---|---|---|"]
  for snap, config in README_SNAPSHOTS:
    path = os.path.join(root, snap, "results.json")
    if not os.path.exists(path):
      lines.append(f"| {snap} | {_link(config)} | no results.json committed | – | – |")
      continue
    res, exp = load(os.path.join(root, snap))
    if exp.readme is None:
      continue
    prov = res.get("provenance") or ""
    mark = (RECONSTRUCTED if "reconstructed" in prov else "") + (STALE if "STALE" in prov else "")
    for r in exp.readme(res):
      lines.append(f"| {_cell(r.label)} | {_link(config)} | {_cell(r.ours)}{mark} | {_cell(r.paper)} | "
                   f"[{os.path.basename(snap)}]({snap}/table.md) |")
  notes = "".join(text for m, text in FOOTNOTES.items() if any(m in ln for ln in lines[2:]))  # only marks in use
  return "\n".join(lines) + "\n\n" + notes


def render_readme(text: str, rows: str) -> str:
  """`text` with the block between the results markers replaced by `rows`."""
  if BEGIN not in text or END not in text:
    raise ValueError(f"README has no {BEGIN} ... {END} block")
  head, rest = text.split(BEGIN, 1)
  _, tail = rest.split(END, 1)
  return f"{head}{BEGIN}\n{rows}{END}{tail}"


# ------------------------------------------------------------------------------------------ includes
INCLUDE = re.compile(r"<!-- table: (?P<spec>[^\n]*?) -->\n(?P<body>.*?)<!-- table:end -->", re.S)
# Markdown files whose include blocks `--readme` rewrites (paths relative to ROOT).
INCLUDE_FILES = ("README.md", "docs/*.md")


def _parse_spec(spec: str) -> tuple[str, dict[str, str]]:
  parts = spec.split()
  if not parts:
    raise ValueError("empty table include")
  opts = {}
  for p in parts[1:]:
    key, sep, value = p.partition("=")
    if not sep or key not in ("section", "columns", "where"):
      raise ValueError(f"table include {spec!r}: unknown option {p!r} (known: section=, columns=, where=)")
    opts[key] = value
  return parts[0], opts


def _snapshot_tables(snap: str, root: str) -> tuple[dict, dict[str, tuple[tuple[str, ...], list[dict]]]]:
  """(results dict, {table name: (columns, rows)}) of one committed snapshot, experiment or benchmark."""
  path = os.path.join(root, snap, "results.json")
  if not os.path.exists(path):
    raise ValueError(f"table include names {snap}, which has no results.json")
  with open(path) as f:
    res = json.load(f)
  if "bench" in res:
    return res, {name: (tuple(t["columns"]), list(t["rows"])) for name, t in res["tables"].items()}
  exp = registry.get(res["experiment"])
  rows = _rows_of(res, exp)
  return res, {t.name: (t.columns, [r for r in rows if r.get("table") == t.name]) for t in experiment_tables(exp)}


def include_table(spec: str, root: str = ROOT, doc: str = "README.md") -> str:
  """The markdown an include block `<!-- table: SPEC -->` holds (see the module docstring).

  `doc` is the markdown file (relative to `root`) the block sits in: the link to the snapshot is relative to it.
  """
  snap, opts = _parse_spec(spec)
  res, found = _snapshot_tables(snap, root)
  name = opts.get("section") or next(iter(found))
  if name not in found:
    raise ValueError(f"table include {spec!r}: {snap} has no table {name!r} (has {sorted(found)})")
  columns, rows = found[name]
  if "columns" in opts:
    columns = tuple(c for c in opts["columns"].split(",") if c)
    missing = [c for c in columns if all(c not in r for r in rows)]
    if missing:
      raise ValueError(f"table include {spec!r}: no row of {snap}:{name} has columns {missing}")
  for cond in filter(None, opts.get("where", "").split("&")):
    col, _, value = cond.partition("=")
    rows = [r for r in rows if tables.format_value(r.get(col)) == value]
  if not rows:
    raise ValueError(f"table include {spec!r}: no rows left in {snap}:{name}")
  has_md = "experiment" in res or os.path.exists(os.path.join(root, snap, "table.md"))  # benchlib writes one too
  target = os.path.join(snap, "table.md" if has_md else "results.json")
  src = f"[`{snap}`]({os.path.relpath(target, os.path.dirname(doc) or '.')})"
  device = res.get("device")
  return (tables.markdown_table(rows, columns) + "\n"
          + f"<sub>Generated from {src}" + (f" ({device})" if device else "")
          + " by `python -m experiments.report --readme`; do not edit.</sub>\n")


def render_includes(text: str, root: str = ROOT, doc: str = "README.md") -> str:
  """`text` (the markdown file `doc`, relative to `root`) with every include block redrawn from its snapshot."""
  return INCLUDE.sub(
      lambda m: f"<!-- table: {m['spec']} -->\n{include_table(m['spec'], root, doc)}<!-- table:end -->", text)


def include_paths(root: str = ROOT) -> list[str]:
  """The markdown files that may hold include blocks."""
  out = []
  for pattern in INCLUDE_FILES:
    out += sorted(glob.glob(os.path.join(root, pattern)))
  return out


def regenerate(root: str = ROOT) -> dict[str, tuple[str, str]]:
  """{path: (current text, regenerated text)} for README.md (results rows and includes) and docs/*.md."""
  out = {}
  for path in include_paths(root):
    with open(path) as f:
      text = f.read()
    new = text
    if os.path.abspath(path) == os.path.abspath(os.path.join(root, "README.md")):
      new = render_readme(new, readme_rows(root))
    out[path] = (text, render_includes(new, root, os.path.relpath(path, root)))
  return out


def main(argv):
  del argv
  if flags.FLAGS.readme:
    stale = {p: new for p, (text, new) in regenerate().items() if new != text}
    if flags.FLAGS.check:
      if stale:
        print(f"stale generated tables in {sorted(stale)}: run `python -m experiments.report --readme`",
              file=sys.stderr)
        sys.exit(1)
      return
    for path, new in stale.items():
      results_lib.write_text(path, new)
      print(path)
    return
  if not flags.FLAGS.workdir:
    raise app.UsageError("give --workdir DIR or --readme")
  for p in write_reports(flags.FLAGS.workdir):
    print(p)


if __name__ == "__main__":
  # Defined here, not at import time: the launcher imports this module and has its own --workdir.
  flags.DEFINE_string("workdir", None, "Directory holding results.json.")
  flags.DEFINE_bool("readme", False, "Rewrite README.md's results rows and every `<!-- table: ... -->` block in README.md and docs/*.md from "
                    "docs/results/*/results.json.")
  flags.DEFINE_bool("check", False, "With --readme: only check, exit 1 if README.md differs.")
  app.run(main)
