"""The registry of experiments: `config.experiment` names one of these.

To add an experiment: write `experiments/<name>.py` defining a module-level
`EXPERIMENT = Experiment(...)`, add `"<name>": "experiments.<name>"` to `_MODULES`, and write
`configs/<name>.py` with `get_config(arg)` (including a `smoke` variant).
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Any, Callable, NamedTuple, Sequence


class Output(NamedTuple):
  """What an experiment's `run` returns.

  rows: one dict per table row (json-able values). A row that could not be run carries a
    `status` such as "not run: data not found at <path>" and no made-up numbers.
  notes: free-form facts about the run (data source, model accuracy, timings) that go to
    results.json and table.md.
  """

  rows: list[dict]
  notes: dict


@dataclasses.dataclass(frozen=True)
class Experiment:
  """An experiment: a `run` function plus how to present its rows.

  Attributes:
    name: registry name (equals `config.experiment`).
    run: `run(config, workdir, rng) -> Output`. `rng` is the root PRNG key built from
      `config.seed`; the same config and seed must give the same numbers.
    columns: the columns of table.md, in order (rows may hold more keys than these).
    plot: optional `plot(rows, notes) -> {filename_stem: matplotlib Figure}`. Plots are built
      from saved rows only, so `python -m experiments.report --workdir DIR` can redraw them.
    title: a one-line title for table.md.
  """

  name: str
  run: Callable[..., Output]
  columns: Sequence[str]
  plot: Callable[[list[dict], dict], dict[str, Any]] | None = None
  title: str = ""


_MODULES = {
    "rf_bias": "experiments.rf_bias",
    "rf_lm": "experiments.rf_lm",
    "adaptive_synthetic": "experiments.adaptive_synthetic",
    "adaptive_llm": "experiments.adaptive_llm",
    "adaptive_mnist": "experiments.adaptive_mnist", "adaptive_eurosat": "experiments.adaptive_eurosat",
    "topk_synthetic": "experiments.topk_synthetic", "topk_bert": "experiments.topk_bert",
}


def names() -> list[str]:
  return sorted(_MODULES)


def get(name: str) -> Experiment:
  """Returns the experiment called `name`; raises ValueError listing known names on a typo."""
  if name not in _MODULES:
    raise ValueError(f"unknown experiment {name!r}; known experiments: {names()}")
  module = importlib.import_module(_MODULES[name])
  exp = getattr(module, "EXPERIMENT")
  if exp.name != name:
    raise ValueError(f"module {_MODULES[name]} defines experiment {exp.name!r}, expected {name!r}")
  return exp
