"""The registry of experiments: `config.experiment` names one of these.

Experiments are grouped by paper, named after the library package they reproduce: `adaptive`
(AdaptiveSoftmax), `rff` (RF-softmax), `topk` (certified top-k). To add an experiment: write
`experiments/<paper>/<table>.py` defining a module-level `EXPERIMENT = Experiment(...)`, add
`"<paper>_<table>": "experiments.<paper>.<table>"` to `_MODULES` (the `rff` experiments keep their historical
`rf_` prefix), and write `configs/<paper>/<table>.py` with `get_config(arg)` (including a `smoke` variant).
"""

from __future__ import annotations

import dataclasses
import glob
import importlib
import importlib.util
import os
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
    tables: the declared tables (`experiments.tables.Table`), in table.md order; every row carries
      `"table": <name>` and only the keys its table declares (checked when results are written).
    columns: legacy single-table form: the columns of table.md (rows may hold more keys). Use `tables`.
    plot: optional `plot(rows, notes) -> {filename_stem: matplotlib Figure}`. Plots are built
      from saved rows only, so `python -m experiments.report --workdir DIR` can redraw them.
    title: a one-line title for table.md.
    readme: optional `readme(results) -> [tables.ReadmeRow]`: README's results rows (one headline number
      per cell) from a saved results dict; used by `python -m experiments.report --readme`.
    mesh: True if `run` takes `mesh=` (the `jax.sharding.Mesh` the launcher builds from `config.mesh`, or None
      for one device); a config with a mesh for an experiment without it is refused.
  """

  name: str
  run: Callable[..., Output]
  columns: Sequence[str] = ()
  plot: Callable[[list[dict], dict], dict[str, Any]] | None = None
  title: str = ""
  tables: Sequence[Any] = ()
  readme: Callable[[dict], list[Any]] | None = None
  mesh: bool = False


_MODULES = {
    "rf_bias": "experiments.rff.bias",
    "rf_lm": "experiments.rff.lm",
    "rf_classification": "experiments.rff.classification",
    "rf_time_to_accuracy": "experiments.rff.time_to_accuracy",
    "adaptive_synthetic": "experiments.adaptive.synthetic", "adaptive_families": "experiments.adaptive.families",
    "adaptive_wallclock": "experiments.adaptive.wallclock",
    "adaptive_llm": "experiments.adaptive.llm",
    "adaptive_mnist": "experiments.adaptive.mnist", "adaptive_eurosat": "experiments.adaptive.eurosat",
    "topk_synthetic": "experiments.topk.synthetic", "topk_bert": "experiments.topk.bert",
    "topk_decoder": "experiments.topk.decoder",
    "sharded_scaleout": "experiments.sharded.scaleout",
    "topk_decoder_sketch": "experiments.topk.decoder_sketch",
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


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_DIR = os.path.join(ROOT, "configs")


def config_paths() -> list[str]:
  """Every config file, as a path relative to the repository root (`configs/<paper>/<table>.py`)."""
  paths = glob.glob(os.path.join(CONFIG_DIR, "*", "*.py"))
  return sorted(os.path.relpath(p, ROOT) for p in paths if not os.path.basename(p).startswith("_"))


def load_config_module(path: str):
  """Imports a config file by path (configs are loaded by path, never imported as a package).

  A relative path that does not exist from the working directory is taken relative to the repository root.
  """
  if not os.path.isabs(path) and not os.path.exists(path):
    path = os.path.join(ROOT, path)
  if not os.path.exists(path):
    raise ValueError(f"config file not found: {path!r}; known configs: {config_paths()}")
  name = "cfg_" + os.path.relpath(os.path.abspath(path), ROOT).replace(os.sep, "_").replace(".", "_")
  spec = importlib.util.spec_from_file_location(name, path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


def load_config(spec: str, arg: str | None = None):
  """The ConfigDict of `spec` = "path.py[:arg]" (or `path.py` plus `arg`), as `--config` would build it."""
  path, _, spec_arg = spec.partition(":")
  return load_config_module(path).get_config(arg if arg is not None else (spec_arg or None))
