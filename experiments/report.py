"""Turns a saved `results.json` into `table.md` and PNG plots (no re-running).

    python -m experiments.report --workdir results/adaptive_synthetic
"""

from __future__ import annotations

import json
import os

from absl import app, flags

from asoftmax import results as results_lib
from experiments import registry


def render_table(res: dict, exp: registry.Experiment) -> str:
  """The table.md text for one saved results dict."""
  lines = [f"# {exp.title or exp.name}", ""]
  lines.append(
      f"Config `{res.get('config_name')}`, seed {res.get('seed')}, device {res.get('device')}, "
      f"jax {res.get('jax_version')}, wall-clock {res.get('wall_s', 0):.1f} s."
  )
  lines.append("")
  lines.append(results_lib.markdown_table(res["rows"], list(exp.columns)))
  notes = res.get("notes") or {}
  if notes:
    lines.append("## Notes")
    lines.append("")
    for k, v in notes.items():
      lines.append(f"- **{k}**: {results_lib.format_value(v) if not isinstance(v, str) else v}")
    lines.append("")
  return "\n".join(lines)


def write_reports(workdir: str) -> list[str]:
  """Writes table.md and plots for `workdir/results.json`; returns the paths written."""
  with open(os.path.join(workdir, "results.json")) as f:
    res = json.load(f)
  exp = registry.get(res["experiment"])
  written = []
  path = os.path.join(workdir, "table.md")
  results_lib.write_text(path, render_table(res, exp))
  written.append(path)
  if exp.plot is not None:
    import matplotlib

    matplotlib.use("Agg")
    for stem, fig in exp.plot(res["rows"], res.get("notes") or {}).items():
      path = os.path.join(workdir, f"{stem}.png")
      results_lib.save_figure(fig, path)
      written.append(path)
  return written


def main(argv):
  del argv
  for p in write_reports(flags.FLAGS.workdir):
    print(p)


if __name__ == "__main__":
  # Defined here, not at import time: the launcher imports this module and has its own --workdir.
  flags.DEFINE_string("workdir", None, "Directory holding results.json.", required=True)
  app.run(main)
