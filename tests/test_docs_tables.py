"""Tables in docs/*.md that are not run results but formulas of the library are checked against the library.

(Run results are generated from snapshots by `experiments.report --readme` and checked by tests/experiments/
test_report.py; this covers the rest.)
"""

from __future__ import annotations

import itertools
import pathlib
import re

from asoftmax.rff import tree

DOCS = pathlib.Path(__file__).resolve().parents[1] / "docs"


def _size(nbytes: int) -> str:
  for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
    if nbytes >= scale and nbytes % scale == 0:
      return f"{nbytes // scale} {unit}"
  return f"{nbytes} B"


def test_rff_tree_memory_table_is_tree_nbytes():
  """docs/rff.md's node-memory table (n, D, bucket) cells equal `tree.tree_nbytes(n, 2D, b)`."""
  text = (DOCS / "rff.md").read_text()
  start = text.index("Node memory `tree.tree_nbytes")
  after = itertools.dropwhile(lambda ln: not ln.startswith("|"), text[start:].splitlines()[1:])
  lines = list(itertools.takewhile(lambda ln: ln.startswith("|"), after))  # the table right after the caption
  header = [c.strip() for c in lines[0].strip("|").split("|")]
  buckets = [int(re.search(r"b = (\d+)", h).group(1)) for h in header[2:]]
  rows = lines[2:]
  assert len(rows) >= 3
  for ln in rows:
    cells = [c.strip().strip("*") for c in ln.strip().strip("|").split("|")]
    base, _, exp = cells[0].partition("^")  # "10^6"
    n = int(base) ** int(exp or 1)
    D = int(cells[1])
    for b, cell in zip(buckets, cells[2:]):
      assert cell == _size(tree.tree_nbytes(n, 2 * D, b)), (n, D, b, cell)
