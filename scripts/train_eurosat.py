r"""Trains (or loads) the EuroSAT classifier of `configs/adaptive/eurosat.py` into a workdir, logging progress.

The AdaptiveSoftmax experiment (`python -m experiments.run --config configs/adaptive/eurosat.py --workdir W`)
trains the same model itself when `W` holds no weights; this script does only that step, with a log line every
`--log_every` steps, so a long CPU training can run in the background and the table run reuses its cached weights:

    ASOFTMAX_DATA_DIR=/work/shared/data nice -n 10 python scripts/train_eurosat.py \
        --config configs/adaptive/eurosat.py --workdir /tmp/w_eurosat > /tmp/train_eurosat.log 2>&1 &
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402

from experiments import registry  # noqa: E402
from experiments.adaptive import classification, eurosat  # noqa: E402


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--config", default="configs/adaptive/eurosat.py")
  p.add_argument("--workdir", required=True)
  p.add_argument("--log_every", type=int, default=50)
  p.add_argument("--max_steps", type=int, default=None, help="override config.max_steps (a quick check)")
  args = p.parse_args(argv)
  config = registry.load_config(args.config)
  if args.max_steps is not None:
    config.max_steps = args.max_steps
  os.makedirs(args.workdir, exist_ok=True)
  print(f"jax {jax.__version__}, devices {jax.devices()}", flush=True)
  t0 = time.perf_counter()
  splits = eurosat.load(config, args.workdir)
  print(f"data: {splits.source}; train {len(splits.y_train)}, test {len(splits.y_test)} "
        f"({time.perf_counter() - t0:.1f} s)", flush=True)
  t0 = time.perf_counter()

  def progress(step, steps):
    if step % args.log_every == 0 or step == steps:
      el = time.perf_counter() - t0
      print(f"step {step}/{steps}  {el:.0f} s  eta {el / step * (steps - step):.0f} s", flush=True)

  _, info = classification.trained_classifier(config, args.workdir, splits, progress=progress)
  print({k: v for k, v in info.items()}, flush=True)
  print(f"TEST ACCURACY {info['test_accuracy']:.4f} on {info['n_test']} images", flush=True)


if __name__ == "__main__":
  main()
