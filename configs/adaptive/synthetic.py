r"""AdaptiveSoftmax synthetic scaling in d (paper Figure 2).

Reproduces Baharav et al. (NeurIPS 2024) Fig. 2: n = 100 arms, d log-spaced from 1e3 to 1e6,
epsilon = 0.3, delta = 0.1, 100 trials per d (a fresh random A per trial), for the "toy" and
"gaussian" datasets (see `asoftmax.adaptive.synthetic`). Rows: mean/std samples vs n*d, gain,
success with a 95% Clopper-Pearson interval.

    python -m experiments.run --config configs/adaptive/synthetic.py --workdir results/adaptive_synthetic
    python -m experiments.run --config configs/adaptive/synthetic.py:smoke --workdir /tmp/syn_smoke
    python -m experiments.run --config configs/adaptive/synthetic.py:toy       # one dataset
    python -m experiments.run --config configs/adaptive/synthetic.py --config.trials=20

Time (measured, CPU, 2 cores): full run ~7 min (dominated by generating the 100 x 1e6 matrices);
smoke < 10 s.
"""

import ml_collections

from asoftmax import configlib


def get_config(arg=None):
  a = configlib.parse_arg(arg, variant="full")
  c = ml_collections.ConfigDict()
  c.experiment = "adaptive_synthetic"
  c.seed = 0
  c.data_dir = configlib.default_data_dir()  # unused: synthetic data

  # Problem.
  c.datasets = ("toy", "gaussian")
  c.n = 100
  c.d_min = 1_000
  c.d_max = 1_000_000
  c.num_d = 7  # log-spaced points between d_min and d_max
  c.trials = 100

  # Algorithm.
  c.k = 1
  c.epsilon = 0.3
  c.delta = 0.1
  c.beta = 1.0
  c.order = "importance"  # or "uniform"

  if a["variant"] in ("toy", "gaussian"):
    c.datasets = (a["variant"],)
  elif a["variant"] == "smoke":
    c.n = 20
    c.d_min = 200
    c.d_max = 2_000
    c.num_d = 2
    c.trials = 5
  elif a["variant"] != "full":
    raise ValueError(f"unknown variant {a['variant']!r}; use full, toy, gaussian or smoke")
  return c
