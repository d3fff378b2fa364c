r"""Rebuilds `results.json` of a committed snapshot from its `table.md` when the run's own results.json was not kept.

    python scripts/reconstruct_results.py docs/results/adaptive_mnist [...]

The snapshots committed before results.json was kept hold only table.md (numbers rounded to ~4 significant
digits), config.json and plots. This parses table.md's rows back into typed rows of the experiment's declared
tables (old column names mapped to the new ones; columns a table no longer declares are dropped), keeps the
header facts (config, seed, device, jax, wall-clock) and the notes as text, and marks the file with a
`provenance` line that table.md and README show. No number is computed or changed: every value is a cell of
the committed table. Per-query data (e.g. samples per query) was never in table.md, so plots that need it are
not redrawn from a reconstructed file.
"""

from __future__ import annotations

import json
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from asoftmax import results  # noqa: E402
from experiments import registry, report  # noqa: E402

# Old column -> new key, per experiment (only where a name changed).
RENAMES = {
    "adaptive_synthetic": {"paper_gain_at_max_d": "paper_gain"},
}
# topk_bert's old single table had a `kind` column; output_error rows called the bound `method`.
KIND_COLUMN = "kind"


def parse_cell(s: str):
  s = s.strip().replace("\\|", "|")
  if s in ("–", ""):
    return None
  if s == "yes":
    return True
  if s == "no":
    return False
  if re.fullmatch(r"-?\d+", s):
    return int(s)
  try:
    return float(s)
  except ValueError:
    return s


def parse_table_md(text: str) -> tuple[dict, list[dict], dict]:
  """(header facts, rows as dicts of the old columns, notes) of an old single-table table.md."""
  lines = text.splitlines()
  head = {}
  m = re.search(r"Config `([^`]*)`, seed (\S+), device (\S+), jax (\S+), wall-clock ([\d.]+) s", text)
  if m:
    head = {"config_name": m.group(1), "seed": parse_cell(m.group(2)), "device": m.group(3).rstrip(","),
            "jax_version": m.group(4).rstrip(","), "wall_s": float(m.group(5))}
  rows, cols, notes = [], None, {}
  in_notes = False
  for line in lines:
    if line.startswith("## Notes"):
      in_notes = True
      continue
    if in_notes:
      nm = re.match(r"- \*\*(.+?)\*\*: (.*)", line)
      if nm:
        notes[nm.group(1)] = nm.group(2)
      continue
    if line.startswith("|") and cols is None:
      cols = [c.strip() for c in line.strip().strip("|").split("|")]
      continue
    if line.startswith("|---"):
      continue
    if line.startswith("|") and cols is not None:
      cells = re.split(r"(?<!\\)\|", line.strip()[1:-1])
      rows.append(dict(zip(cols, (parse_cell(c) for c in cells))))
  return head, rows, notes


def typed_rows(name: str, rows: list[dict]) -> list[dict]:
  exp = registry.get(name)
  specs = {t.name: t for t in report.experiment_tables(exp)}
  out = []
  for r in rows:
    r = {RENAMES.get(name, {}).get(k, k): v for k, v in r.items()}
    if KIND_COLUMN in r and r[KIND_COLUMN] in specs:
      t = specs[r.pop(KIND_COLUMN)]
      if t.name == "output_error" and "method" in r:
        r["bound"] = r.pop("method")
    else:
      r.pop(KIND_COLUMN, None)
      t = next(iter(specs.values()))
    kept = {k: v for k, v in r.items() if k in t.allowed() and k != "table"}
    out.append(t.row(**kept))
  return out


def reconstruct(snapshot: str) -> str:
  with open(os.path.join(snapshot, "table.md")) as f:
    head, rows, notes = parse_table_md(f.read())
  with open(os.path.join(snapshot, "config.json")) as f:
    config = json.load(f)
  name = config["experiment"]
  res = {
      "experiment": name,
      **head,
      "provenance": ("reconstructed from the committed table.md by scripts/reconstruct_results.py (the run's own "
                     "results.json was not kept; values are table cells rounded to ~4 significant digits; "
                     "per-query data is not available)"),
      "notes": notes,
      "rows": typed_rows(name, rows),
  }
  path = os.path.join(snapshot, "results.json")
  results.write_json(path, res)
  return path


if __name__ == "__main__":
  for snap in sys.argv[1:]:
    print(reconstruct(snap))
