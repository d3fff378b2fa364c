"""Turns saved `results.json` files into `table.md`, PNG plots and README's results rows (no re-running).

    python -m experiments.report --workdir results/adaptive_synthetic     # redraw table.md and plots
    python -m experiments.report --readme                                 # rewrite README's results rows
    python -m experiments.report --readme --check                         # exit 1 if README is stale

README's rows live between the markers `<!-- results:begin -->` and `<!-- results:end -->`; each row comes from
one committed snapshot `docs/results/<name>/results.json` (listed in `README_SNAPSHOTS`) through its
experiment's `readme` function: one headline number per cell, a link to the config and to the table.
"""

from __future__ import annotations

import json
import os
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
FOOTNOTES = (
    f"{RECONSTRUCTED} results.json rebuilt from the committed table.md (`scripts/reconstruct_results.py`): the run's "
    "own results.json was not kept; the numbers are that table's cells.\n"
    f"{STALE} the snapshot predates a later fix and was not re-run (see its table.md provenance line).\n")


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
  return "\n".join(lines) + "\n\n" + FOOTNOTES


def render_readme(text: str, rows: str) -> str:
  """`text` with the block between the results markers replaced by `rows`."""
  if BEGIN not in text or END not in text:
    raise ValueError(f"README has no {BEGIN} ... {END} block")
  head, rest = text.split(BEGIN, 1)
  _, tail = rest.split(END, 1)
  return f"{head}{BEGIN}\n{rows}{END}{tail}"


def main(argv):
  del argv
  if flags.FLAGS.readme:
    with open(README) as f:
      text = f.read()
    new = render_readme(text, readme_rows())
    if flags.FLAGS.check:
      if new != text:
        print("README.md results rows are stale: run `python -m experiments.report --readme`", file=sys.stderr)
        sys.exit(1)
      return
    results_lib.write_text(README, new)
    print(README)
    return
  if not flags.FLAGS.workdir:
    raise app.UsageError("give --workdir DIR or --readme")
  for p in write_reports(flags.FLAGS.workdir):
    print(p)


if __name__ == "__main__":
  # Defined here, not at import time: the launcher imports this module and has its own --workdir.
  flags.DEFINE_string("workdir", None, "Directory holding results.json.")
  flags.DEFINE_bool("readme", False, "Rewrite README.md's results rows from docs/results/*/results.json.")
  flags.DEFINE_bool("check", False, "With --readme: only check, exit 1 if README.md differs.")
  app.run(main)
