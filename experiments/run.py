r"""The one launcher for every asoftmax experiment.

    python -m experiments.run --config configs/adaptive/synthetic.py:smoke --workdir /tmp/x
    python -m experiments.run --config configs/adaptive/synthetic.py --config.trials=20

It reads an ml_collections config (`--config path.py[:arg]`, fields overridable with
`--config.<field>=value`; unknown fields and wrong types fail loudly), builds the root PRNG key
from `config.seed`, runs the experiment named by `config.experiment`, and writes atomically:

  DIR/config.json   the resolved config
  DIR/results.json  {"experiment": ..., "rows": [...], "notes": {...}, ...}
  DIR/table.md      our numbers beside the paper's
  DIR/*.png         plots

`--workdir` defaults to `results/<paper>_<table>[-<arg>]`.
"""

from __future__ import annotations

import datetime
import os
import re
import time

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Path to a config file, optionally with `:arg` (e.g. `:smoke`).", lock_config=True
)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Output directory (default: results/<config name>)."
)
flags.mark_flags_as_required(["config"])


def default_workdir(config_path: str) -> str:
  """results/<paper>_<table>[-<arg>] for a `configs/<paper>/<table>.py[:arg]` flag value."""
  path, _, arg = config_path.partition(":")
  stem = os.path.splitext(os.path.basename(path))[0]
  paper = os.path.basename(os.path.dirname(os.path.abspath(path)))
  if paper and paper != "configs":
    stem = f"{paper}_{stem}"
  if arg:
    stem += "-" + re.sub(r"[^A-Za-z0-9_.=-]+", "_", arg)
  return os.path.join("results", stem)


def execute(config, workdir: str, config_name: str = "") -> dict:
  """Runs `config.experiment` and writes config.json, results.json, table.md and plots.

  Args:
    config: an ml_collections ConfigDict with at least `experiment` and `seed`.
    workdir: output directory (created if needed).
    config_name: how the config was named on the command line (recorded in results.json).

  Returns:
    The results dict that was written to results.json.
  """
  import jax

  from asoftmax import results as results_lib
  from experiments import registry, report

  exp = registry.get(config.experiment)
  os.makedirs(workdir, exist_ok=True)
  # A stale results.json from an earlier run must not survive a crash of this one.
  for stale in ("results.json", "table.md"):
    p = os.path.join(workdir, stale)
    if os.path.exists(p):
      os.remove(p)
  results_lib.write_json(os.path.join(workdir, "config.json"), config.to_dict())
  rng = jax.random.key(config.seed)
  started = datetime.datetime.now(datetime.timezone.utc)
  t0 = time.perf_counter()
  out = exp.run(config, workdir, rng)
  wall = time.perf_counter() - t0
  dev = jax.devices()[0]
  res = {
      "experiment": exp.name,
      "config_name": config_name or config.experiment,
      "seed": config.seed,
      "device": f"{dev.platform}:{getattr(dev, 'device_kind', '')}",
      "jax_version": jax.__version__,
      "started_utc": started.isoformat(timespec="seconds"),
      "wall_s": wall,
      "notes": out.notes,
      "rows": out.rows,
  }
  results_lib.write_json(os.path.join(workdir, "results.json"), res)
  report.write_reports(workdir)
  return res


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  # `serialize()` gives back `--config=path.py[:arg]`; keep the `path.py[:arg]` part.
  name = flags.FLAGS["config"].serialize().split("=", 1)[-1]
  workdir = _WORKDIR.value or default_workdir(name)
  logging.info("experiment %s -> %s", _CONFIG.value.experiment, workdir)
  res = execute(_CONFIG.value, workdir, config_name=name)
  print(f"wrote {len(res['rows'])} rows to {workdir}/results.json, table.md")


if __name__ == "__main__":
  app.run(main)
