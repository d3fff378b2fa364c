r"""AdaptiveSoftmax synthetic scaling in d (paper Figure 2).

Reproduces Baharav et al. (NeurIPS 2024) Fig. 2: n = 100 arms, d log-spaced from 1e3 to 1e6,
epsilon = 0.3, delta = 0.1, 100 trials per d (a fresh random A per trial), for the "toy" and
"gaussian" datasets (see `asoftmax.adaptive.synthetic`). Rows: mean/std samples vs n*d, gain,
success with a 95% Clopper-Pearson interval.

    python -m experiments.run --config configs/adaptive/synthetic.py --workdir results/adaptive_synthetic
    python -m experiments.run --config configs/adaptive/synthetic.py:smoke --workdir /tmp/syn_smoke
    python -m experiments.run --config configs/adaptive/synthetic.py:toy       # one dataset
    python -m experiments.run --config configs/adaptive/synthetic.py --config.trials=20
    python -m experiments.run --config configs/adaptive/synthetic.py:issue11 --workdir results/adaptive_synthetic_issue11

Time (measured, CPU, 2 cores): full run ~7 min (dominated by generating the 100 x 1e6 matrices);
smoke < 10 s.
"""

import ml_collections

from asoftmax import configlib


# Arguments after the colon (`--config configs/adaptive/synthetic.py:smoke`), declared as data for `--list`.
ARGS = {"variant": configlib.choice("full", "issue11", "toy", "gaussian", "smoke")}


def get_config(arg=None):
  a = configlib.parse_arg(arg, ARGS)
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
  # Both modes, every row labelled: "paper" (sub-Gaussian radii, fudge 1 here: no tuning on synthetic data)
  # and "certified" (valid for every input). See asoftmax.adaptive.core.
  c.modes = ("paper", "certified")
  # The paper's Fig. 2 does not compute the best arm exactly (which is why its curves are flat in d); the
  # returned probabilities are still within epsilon. Warm-up: 32 pulls per arm (0 = the default rule,
  # d / (17 log(6n/delta)) clipped to [32, d/10], which grows with d).
  c.exact_winners = False
  c.warmup = 32
  c.repeats = 7  # timed calls per (dataset, d, mode) for the wall-clock columns (median; 0: none)

  # Device mesh the launcher builds (empty: one device). E.g. --config.mesh.shape='(8,)'
  # --config.mesh.axis_names="('vocab',)" --config.exact_winners=True splits the arms over 8 devices.
  c.mesh = ml_collections.ConfigDict({"shape": (), "axis_names": ()})

  if a["variant"] in ("toy", "gaussian"):
    c.datasets = (a["variant"],)
  elif a["variant"] == "issue11":
    # d from 1e3 to 1e5 (the reference implementation's comparison point), 20 trials: ~15 min on CPU.
    c.d_max = 100_000
    c.num_d = 5
    c.trials = 20
  elif a["variant"] == "smoke":
    c.n = 20
    c.d_min = 200
    c.d_max = 2_000
    c.num_d = 2
    c.trials = 5
    c.repeats = 2
  return c
