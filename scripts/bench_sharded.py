"""Scale-out benchmark (issue 29): the `sharded_scaleout` experiment with command-line sizes, one process.

The rows, their definitions and the protocol live in `experiments/sharded/scaleout.py`; this script only sets the
sizes and writes DIR/results.json, table.md (via the launcher's writer), with the load average and the command in
the notes. Run on forced host devices:

    XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu python scripts/bench_sharded.py \\
        --head 32064 4096 --workdir docs/results/sharded_scaleout

Forced host devices share the machine's CPU cores: wall-clock there measures overhead, not speed-up.

Unlike the other `scripts/bench_*.py`, this one does not write through `experiments.benchlib`: it runs an
experiment, so its results.json is the launcher's (typed tables, device, jax version, load average, CPU count, and
this command in `config_name`), which `experiments.report` renders and README/docs include the same way.
"""

from __future__ import annotations

import argparse
import os
import sys

from experiments import registry, run


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--devices", type=int, nargs="*", default=[1, 2, 4, 8])
  ap.add_argument("--workloads", nargs="*", default=["cache", "rff", "head"], choices=["cache", "rff", "head"])
  ap.add_argument("--head", type=int, nargs=2, default=[128256, 4096], metavar=("N", "D"))
  ap.add_argument("--queries", type=int, default=64)
  ap.add_argument("--no_adaptive", action="store_true")
  ap.add_argument("--classes", type=int, default=1_000_000)
  ap.add_argument("--draws", type=int, default=20_000)
  ap.add_argument("--keys", type=int, default=32768)
  ap.add_argument("--repeats", type=int, default=3)
  ap.add_argument("--workdir", default="docs/results/sharded_scaleout")
  args = ap.parse_args()
  config = registry.load_config("configs/sharded/scaleout.py")
  with config.unlocked() if hasattr(config, "unlocked") else _null():
    config.devices, config.workloads = tuple(args.devices), tuple(args.workloads)
    config.mesh.shape = (max(args.devices),)  # the launcher's mesh: the largest count (an error if missing)
    config.head, config.queries, config.adaptive = tuple(args.head), args.queries, not args.no_adaptive
    config.classes, config.draws, config.cache_keys, config.repeats = args.classes, args.draws, args.keys, args.repeats
  load = os.getloadavg()[0]
  res = run.execute(config, args.workdir, config_name="scripts/bench_sharded.py " + " ".join(sys.argv[1:]))
  print(f"load average {load:.1f} (start), {os.getloadavg()[0]:.1f} (end); wrote {args.workdir}/results.json")
  return res


class _null:
  def __enter__(self):
    return self

  def __exit__(self, *a):
    return False


if __name__ == "__main__":
  main()
