"""Typed result tables: each experiment declares its tables, each table its columns.

A table kind is a `Table(name, row, ...)` whose `row` is a NamedTuple class: its fields are the columns of
table.md, in order (ours next to the paper's, about ten at most). `hidden` names extra keys a row may carry
into results.json without showing them (per-query samples for plots, wall-clock, provenance).

    class GainRow(NamedTuple):
      dataset: str | None = None
      gain: float | None = None
      paper_gain: float | None = None

    GAIN = Table("gain", GainRow, title="Gain", hidden=("samples",))
    rows.append(GAIN.row(dataset="MNIST", gain=54.5, samples=[...]))   # a misspelt key raises ValueError

Every row written to results.json carries `"table": <name>`; `validate` rejects a row whose table is unknown or
that holds a key its table does not declare, so a misspelt column cannot render silently as "–".

>>> from typing import NamedTuple
>>> class R(NamedTuple):
...   n: int | None = None
...   gain: float | None = None
>>> T = Table("t", R)
>>> T.row(n=3, gain=2.0)
{'table': 't', 'n': 3, 'gain': 2.0}
>>> T.row(n=3, gian=2.0)
Traceback (most recent call last):
  ...
ValueError: table 't': undeclared keys ['gian']; columns ['n', 'gain'], hidden []
>>> print(markdown_table([T.row(n=3, gain=2.0), T.row(n=4)], T.columns), end="")
| n | gain |
|---|---|
| 3 | 2 |
| 4 | – |
"""

from __future__ import annotations

import dataclasses
import io
import math
from typing import Any, Iterable, NamedTuple, Sequence

from asoftmax import results as results_lib

# Keys any row may hold: the table it belongs to, and why it was not run.
COMMON_HIDDEN = ("table",)


@dataclasses.dataclass(frozen=True)
class Table:
  """One kind of row: a name, a NamedTuple whose fields are the shown columns, and allowed hidden keys."""

  name: str
  row_type: type
  title: str = ""
  hidden: tuple[str, ...] = ()

  @property
  def columns(self) -> tuple[str, ...]:
    return tuple(self.row_type._fields)

  def allowed(self) -> frozenset[str]:
    return frozenset(self.columns) | frozenset(self.hidden) | frozenset(COMMON_HIDDEN)

  def row(self, **values: Any) -> dict:
    """A results.json row of this table: every column present (None where not given) plus hidden keys."""
    bad = sorted(k for k in values if k not in self.allowed())
    if bad:
      raise ValueError(f"table {self.name!r}: undeclared keys {bad}; columns {list(self.columns)}, "
                       f"hidden {list(self.hidden)}")
    out = {"table": self.name}
    out.update(self.row_type(**{k: values[k] for k in self.columns if k in values})._asdict())
    out.update({k: values[k] for k in self.hidden if k in values})
    return out


class ReadmeRow(NamedTuple):
  """One README results row: which paper table, our headline number, the paper's (one number per cell)."""

  label: str
  ours: str
  paper: str


def validate(rows: Sequence[dict], tables: Sequence[Table]) -> None:
  """Raises ValueError if a row names no declared table or holds a key its table does not declare."""
  by_name = {t.name: t for t in tables}
  for i, r in enumerate(rows):
    t = by_name.get(r.get("table"))
    if t is None:
      raise ValueError(f"row {i} has table {r.get('table')!r}; declared tables: {sorted(by_name)}")
    bad = sorted(set(r) - t.allowed())
    if bad:
      raise ValueError(f"row {i} of table {t.name!r} holds undeclared keys {bad}; columns {list(t.columns)}, "
                       f"hidden {list(t.hidden)}")


def empty_columns(rows: Sequence[dict], table: Table) -> list[str]:
  """Declared columns of `table` that hold no value (None or absent) in any of its rows."""
  mine = [r for r in rows if r.get("table") == table.name]
  return [c for c in table.columns if all(r.get(c) is None for r in mine)]


def format_value(v: Any) -> str:
  """A table cell: None as an en dash, bools as yes/no, floats to about four significant digits."""
  if v is None:
    return "–"
  if isinstance(v, bool):
    return "yes" if v else "no"
  if isinstance(v, int):
    return str(v)
  if isinstance(v, float):
    if not math.isfinite(v):
      return str(v)
    a = abs(v)
    if a == 0:
      return "0"
    if a >= 1e5 or a < 1e-3:
      return f"{v:.3g}"
    if a >= 100:
      return f"{v:.1f}"
    return f"{v:.4g}"
  if isinstance(v, (list, tuple)):
    return "[" + ", ".join(format_value(x) for x in v) + "]"
  return str(v).replace("|", "\\|").replace("\n", " ")


def markdown_table(rows: Iterable[dict], columns: Sequence[str]) -> str:
  """Renders rows as a GitHub markdown table with the given column order (missing values as an en dash)."""
  rows = list(rows)
  lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
  for r in rows:
    lines.append("| " + " | ".join(format_value(r.get(c)) for c in columns) + " |")
  return "\n".join(lines) + "\n"


def save_figure(fig, path: str, dpi: int = 120) -> None:
  """Saves a matplotlib figure as PNG atomically and closes it."""
  import matplotlib.pyplot as plt

  buf = io.BytesIO()
  fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
  plt.close(fig)
  results_lib.atomic_write_bytes(path, buf.getvalue())
