r"""The one launcher for every asoftmax experiment.

    python -m experiments.run --config configs/adaptive/synthetic.py:smoke --workdir /tmp/x
    python -m experiments.run --config configs/adaptive/synthetic.py --config.trials=20
    python -m experiments.run --list                                              # configs, variants, modules
    python -m experiments.run --config configs/topk/bert.py:smoke --show_config   # fields with their comments

It reads an ml_collections config (`--config path.py[:arg]`, fields overridable with
`--config.<field>=value`; unknown fields and wrong types fail loudly), builds the root PRNG key
from `config.seed`, runs the experiment named by `config.experiment`, and writes atomically:

  DIR/config.json   the resolved config
  DIR/results.json  {"experiment": ..., "config": {...}, "rows": [...], "notes": {...}, ...}
  DIR/table.md      our numbers beside the paper's
  DIR/*.png         plots

`--workdir` defaults to `results/<paper>_<table>[-<arg>]`.

Before anything runs, every path the user gave (a `*_dir`, `*_path` or `snapshot` field that differs from the
config's own default with $ASOFTMAX_DATA_DIR unset) must exist, else the run exits non-zero naming it
(`check_user_paths`); defaults the user did not give keep their fallback ("not run" rows, built-in data). One run
at a time per workdir: a run holds an advisory lock on DIR/.lock (`fcntl.flock`), and a second run exits non-zero
naming the workdir.

`config.mesh` (optional; absent or an empty `shape`: one device, no mesh) names a device mesh: `shape` (axis sizes)
and `axis_names`, e.g. `--config.mesh.shape="(8,)" --config.mesh.axis_names="('vocab',)"`. The launcher builds it
with `jax.make_mesh` (Auto axes, the first prod(shape) of `jax.devices()`), hands it to experiments that declare
`mesh=True` as `run(config, workdir, rng, mesh=mesh)`, and records it in results.json (`"mesh"`: axis sizes and
device count). Devices that do not exist, or a mesh for an experiment that does not take one, exit non-zero naming
`config.mesh` before anything runs (on one machine: `XLA_FLAGS=--xla_force_host_platform_device_count=8`).
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import os
import re
import time
from typing import Iterator

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Path to a config file, optionally with `:arg` (e.g. `:smoke`). Fields are overridden with "
    "`--config.<field>=value`; `config.mesh` (shape, axis_names; absent or empty: one device) is the device mesh the "
    "launcher builds with jax.make_mesh for experiments that run sharded, e.g. --config.mesh.shape='(8,)' "
    "--config.mesh.axis_names=\"('vocab',)\" (needs 8 devices: on CPU "
    "XLA_FLAGS=--xla_force_host_platform_device_count=8).", lock_config=True
)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Output directory (default: results/<config name>)."
)
_LIST = flags.DEFINE_bool("list", False, "Print every config, its variants (`:arg`) and experiment module, then exit.")
_SHOW = flags.DEFINE_bool("show_config", False, "Print the fields of --config with their comments, then exit.")


def config_variants(path: str) -> tuple[list[str], dict[str, str]]:
  """(variants, other `key=value` args with their defaults) that a config's `get_config(arg)` understands, read
  from the module's `ARGS` declaration (`asoftmax.configlib.Arg`), never from its source text."""
  from experiments import registry

  spec = getattr(registry.load_config_module(path), "ARGS", None)
  if spec is None:
    raise ValueError(f"{path} declares no ARGS (see asoftmax.configlib.parse_arg)")
  variants = list(spec["variant"].choices or (spec["variant"].default,)) if "variant" in spec else []
  args = {k: (f"{v.default}" + (f" ({'|'.join(map(str, v.choices))})" if v.choices else "")) for k, v in spec.items()
          if k != "variant"}
  return variants, args


def _root() -> str:
  from experiments import registry

  return registry.ROOT


def list_text() -> str:
  """The text `--list` prints: one line per config with its variants, args and experiment module."""
  from experiments import registry

  lines = []
  for path in registry.config_paths():
    try:
      name = registry.load_config(path).experiment
      module = registry.get(name).run.__module__
    except Exception as e:  # pylint: disable=broad-except
      name, module = "?", f"(config does not load: {e})"
    variants, args = config_variants(path)
    extra = " ".join(f"{k}={v}" for k, v in args.items())
    lines.append(f"{path}  variants: {', '.join(':' + v for v in variants)}" + (f"  args: {extra}" if extra else "")
                 + f"  -> {name} ({module})")
  return "\n".join(lines)


def field_comments(path: str) -> dict[str, str]:
  """{field: comment} for `--show_config`: the comment on a config's `c.field = ...` line, else the comment lines
  right above it (no blank line between). Only documentation comes from the file (read with `tokenize` and
  `ast`, the first assignment of a field in the file wins); every value comes from the resolved config."""
  import ast
  import io
  import tokenize

  with open(os.path.join(_root(), path) if not os.path.exists(path) else path) as f:
    src = f.read()
  comments = {t.start[0]: t.string.lstrip("#").strip()
              for t in tokenize.generate_tokens(io.StringIO(src).readline) if t.type == tokenize.COMMENT}
  lines = src.splitlines()

  def dotted(node) -> str | None:  # c.a.b -> "a.b"
    parts = []
    while isinstance(node, ast.Attribute):
      parts.append(node.attr)
      node = node.value
    return ".".join(reversed(parts)) if isinstance(node, ast.Name) and node.id == "c" and parts else None

  out = {}
  assigns = sorted((n for n in ast.walk(ast.parse(src)) if isinstance(n, ast.Assign)), key=lambda n: n.lineno)
  for node in assigns:
    names = [dotted(t) for t in node.targets]
    names = [n for n in names if n and n not in out]
    if not names:
      continue
    text = next((comments[i] for i in range(node.lineno, node.end_lineno + 1) if i in comments), "")
    if not text:
      above, i = [], node.lineno - 1
      while i >= 1 and lines[i - 1].strip().startswith("#"):
        above.insert(0, comments.get(i, ""))
        i -= 1
      text = " ".join(x for x in above if x)
    for n in names:
      out[n] = text
  return out


def show_config_text(config, path: str) -> str:
  """The text `--show_config` prints: `field = value  # comment` for every field of the resolved config."""
  comments = field_comments(path)
  flat = {}

  def walk(prefix, d):
    for k, v in d.items():
      if isinstance(v, dict):
        walk(prefix + k + ".", v)
      else:
        flat[prefix + k] = v

  walk("", config.to_dict())
  width = max(len(k) for k in flat)
  return "\n".join(f"{k:<{width}} = {v!r}" + (f"  # {comments[k]}" if comments.get(k) else "") for k, v in flat.items())


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


def stale_outputs(workdir: str) -> list[str]:
  """The files of an earlier run that `execute` removes first: results.json, table.md and every plot."""
  names = ("results.json", "table.md", "config.json")
  return sorted(os.path.join(workdir, f) for f in os.listdir(workdir)
                if f in names or f.endswith((".png", ".pdf", ".svg")))


class MeshError(ValueError):
  """`config.mesh` cannot be built (bad fields, missing devices) or the experiment does not run on a mesh."""


def build_mesh(config):
  """The `jax.sharding.Mesh` that `config.mesh` names, or None (no field, or an empty shape: one device).

  Raises:
    MeshError: naming `config.mesh`: sizes not positive integers, names not distinct non-empty strings (one per
      axis), or more devices than `jax.devices()` has.
  """
  spec = config.get("mesh")
  if spec is None:
    return None
  shape, names = spec.get("shape", ()), spec.get("axis_names", ())
  shape = (shape,) if isinstance(shape, int) else tuple(shape or ())
  names = (names,) if isinstance(names, str) else tuple(names or ())
  if not shape and not names:
    return None
  if (not shape or len(shape) != len(names) or any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in shape)
      or any(not isinstance(a, str) or not a for a in names) or len(set(names)) != len(names)):
    raise MeshError(f"config.mesh must give positive integer sizes (shape) and one distinct non-empty name per axis "
                    f"(axis_names), e.g. shape=(8,), axis_names=('vocab',); got shape={shape}, axis_names={names}")
  import jax
  import numpy as np

  devices = jax.devices()
  need = int(np.prod(shape))
  if need > len(devices):
    raise MeshError(f"config.mesh asks for {need} devices (shape {shape}, axes {names}) but this process has "
                    f"{len(devices)} ({devices[0].platform}); on one machine start it with "
                    f"XLA_FLAGS=--xla_force_host_platform_device_count={need} JAX_PLATFORMS=cpu, or pass a smaller "
                    "--config.mesh.shape")
  return jax.make_mesh(shape, names, axis_types=(jax.sharding.AxisType.Auto,) * len(shape), devices=devices[:need])


def mesh_record(mesh) -> dict:
  """What results.json records of the mesh: axis sizes and device count (one device when there is none)."""
  if mesh is None:
    return {"axis_sizes": {}, "devices": 1}
  return {"axis_sizes": {a: int(s) for a, s in mesh.shape.items()}, "devices": int(mesh.devices.size),
          "device_kind": f"{mesh.devices.flat[0].platform}:{getattr(mesh.devices.flat[0], 'device_kind', '')}"}


class WorkdirBusy(RuntimeError):
  """Another run holds the workdir's lock (DIR/.lock)."""


@contextlib.contextmanager
def workdir_lock(workdir: str) -> Iterator[None]:
  """Holds an exclusive advisory lock (`fcntl.flock`) on `workdir/.lock` for the duration; raises `WorkdirBusy`
  naming the workdir if another process holds it. The lock file is left in place (deleting it would race)."""
  path = os.path.join(workdir, ".lock")
  with open(path, "a") as f:
    try:
      fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      raise WorkdirBusy(f"workdir {workdir} is in use by another run (it holds {path}); wait for that run to end "
                        "or pick another --workdir") from None
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


def path_fields(config) -> dict[str, str]:
  """{dotted name: value} of the config's path fields: string fields named `*_dir`, `*_path` or `snapshot`."""
  out = {}

  def walk(prefix, d):
    for k, v in d.items():
      if isinstance(v, dict):
        walk(prefix + k + ".", v)
      elif isinstance(v, str) and (k.endswith(("_dir", "_path")) or k == "snapshot"):
        out[prefix + k] = v

  walk("", config.to_dict())
  return out


def _fallback_paths(config, config_name: str) -> dict[str, str]:
  """The path fields of the config's defaults with $ASOFTMAX_DATA_DIR unset: from `config_name` ("path.py[:arg]")
  when given, else from the config file whose default experiment is `config.experiment`."""
  from asoftmax import configlib
  from experiments import registry

  env = os.environ.pop(configlib.DATA_DIR_ENV, None)
  try:
    if config_name and config_name.partition(":")[0].endswith(".py"):
      default = registry.load_config(config_name)
    else:
      default = next((c for c in map(registry.load_config, registry.config_paths())
                      if c.get("experiment") == config.get("experiment")), None)
  finally:
    if env is not None:
      os.environ[configlib.DATA_DIR_ENV] = env
  return path_fields(default) if default is not None else {}


def check_user_paths(config, config_name: str = "") -> None:
  """Raises FileNotFoundError naming every field and path the user gave that does not exist.

  A path field counts as given by the user when it is non-empty and differs from the config's default with
  $ASOFTMAX_DATA_DIR unset (a `--config.<field>=...` override, or the environment variable); such a path must exist.
  A default the user did not give (e.g. rf_bias' `results/rf_lm/snapshot.npz` before rf_lm has run) may be missing:
  the experiment then falls back as documented ("not run" rows, built-in data). Nothing is imported or run.
  """
  fallback = _fallback_paths(config, config_name)
  missing = [f"{name} = {value!r}" for name, value in path_fields(config).items()
             if value and value != fallback.get(name) and not os.path.exists(value)]
  if missing:
    raise FileNotFoundError(f"{'; '.join(missing)}: no such file or directory (a path you give must exist; leave "
                            "the field empty for the default)")


def execute(config, workdir: str, config_name: str = "") -> dict:
  """Runs `config.experiment` and writes config.json, results.json, table.md and plots.

  Args:
    config: an ml_collections ConfigDict with at least `experiment` and `seed`.
    workdir: output directory (created if needed).
    config_name: how the config was named on the command line (recorded in results.json; its defaults tell which
      paths the user gave, see `check_user_paths`).

  Returns:
    The results dict that was written to results.json (the resolved config under "config").

  Raises:
    FileNotFoundError: a path the user gave does not exist (checked before anything runs).
    MeshError: `config.mesh` cannot be built here, or the experiment does not run on a mesh (checked before).
    WorkdirBusy: another run holds the workdir.
  """
  check_user_paths(config, config_name)
  import jax

  from asoftmax import results as results_lib
  from experiments import registry

  exp = registry.get(config.experiment)
  mesh = build_mesh(config)
  if mesh is not None and not exp.mesh:
    raise MeshError(f"config.mesh is set but experiment {exp.name!r} does not run on a mesh (those that do: "
                    f"{[n for n in registry.names() if registry.get(n).mesh]})")
  os.makedirs(workdir, exist_ok=True)
  with workdir_lock(workdir):
    return _execute_locked(config, workdir, config_name, exp, jax, results_lib, mesh)


def _execute_locked(config, workdir, config_name, exp, jax, results_lib, mesh=None) -> dict:
  from experiments import report

  # Outputs of an earlier run (results, table, plots) must not survive a crash of this one beside the new config.
  for stale in stale_outputs(workdir):
    os.remove(stale)
  results_lib.write_json(os.path.join(workdir, "config.json"), config.to_dict())
  rng = jax.random.key(config.seed)
  started = datetime.datetime.now(datetime.timezone.utc)
  load_start = os.getloadavg()[0]
  t0 = time.perf_counter()
  out = exp.run(config, workdir, rng, mesh=mesh) if exp.mesh else exp.run(config, workdir, rng)
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
      # 1-minute load average of the machine at start and end (other jobs slow wall-clock columns).
      "load_average": [round(load_start, 2), round(os.getloadavg()[0], 2)],
      "cpu_count": os.cpu_count(),
      "mesh": mesh_record(mesh),  # config.mesh as built: axis sizes and device count
      "config": config.to_dict(),  # the resolved config (older snapshots lack it)
      "notes": out.notes,
      "rows": out.rows,
  }
  results_lib.write_json(os.path.join(workdir, "results.json"), res)
  report.write_reports(workdir)
  return res


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if _LIST.value:
    print(list_text())
    return
  if _CONFIG.value is None:
    raise app.UsageError("--config is required (see --list for the configs)")
  # `serialize()` gives back `--config=path.py[:arg]`; keep the `path.py[:arg]` part.
  name = flags.FLAGS["config"].serialize().split("=", 1)[-1]
  if _SHOW.value:
    print(show_config_text(_CONFIG.value, name.partition(":")[0]))
    return
  workdir = _WORKDIR.value or default_workdir(name)
  logging.info("experiment %s -> %s", _CONFIG.value.experiment, workdir)
  try:
    res = execute(_CONFIG.value, workdir, config_name=name)
  except (FileNotFoundError, MeshError, WorkdirBusy) as e:  # a missing path or device, or a busy workdir
    raise SystemExit(f"error: {e}") from None
  print(f"wrote {len(res['rows'])} rows to {workdir}/results.json, table.md")


if __name__ == "__main__":
  app.run(main)
