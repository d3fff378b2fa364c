r"""RF-softmax bias: proposal closeness and sampled-softmax gradient bias vs D, nu, m (Rawat et al. 2019).

Reproduces the paper's bias analysis (its figures on how well each q approximates the softmax and on the
gradient bias against D; no numbers verified, see `experiments/rff/paper.py`) on (a) synthetic unit-sphere
vectors with peaked softmaxes and (b) the class/query vectors of the PTB model trained by `configs/rff/lm.py`.

    python -m experiments.run --config configs/rff/bias.py --workdir results/rf_bias
    python -m experiments.run --config configs/rff/bias.py:smoke --workdir /tmp/rf_bias_smoke

Time (measured, CPU, 2 cores shared with other jobs): full run 339 s (240 rows: 192 synthetic + 48 from the
rf_lm snapshot; the snapshot rows need `results/rf_lm/snapshot.npz`, else they are marked not run); smoke 11 s.
"""

import ml_collections

from asoftmax import configlib


# Arguments after the colon (`--config configs/rff/bias.py:smoke`), declared as data for `--list`.
ARGS = {"variant": configlib.choice("full", "smoke")}


def get_config(arg=None):
  a = configlib.parse_arg(arg, ARGS)
  c = ml_collections.ConfigDict()
  c.experiment = "rf_bias"
  c.seed = 0
  c.data_dir = configlib.default_data_dir()  # unused: synthetic vectors or an rf_lm snapshot

  # Setting (a): synthetic unit-sphere classes; queries near a true class so the softmax is peaked.
  c.synthetic_n = 4096
  c.synthetic_d = (64,)
  c.synthetic_noise = 1.0  # h = normalize(c_t + noise * g / sqrt(d))
  c.taus = (5.0, 8.0, 11.0, 14.0)  # spans mean top-1 probability ~0.01 .. 0.5 (measured, see table)
  c.num_queries = 8
  # Setting (b): the snapshot written by rf_lm (class vectors, held-out queries, targets, tau); '' skips it.
  c.snapshot = "results/rf_lm/snapshot.npz"

  # Samplers.
  c.samplers = ("uniform", "unigram", "quadratic", "rff", "exact")
  c.rff_D = (64, 256, 1024, 4096)
  c.rff_nu = (2.0, 4.0, 0.0)  # 0 means nu = tau; values above tau are skipped
  c.rff_kappa = 0.01
  c.quadratic_alpha = 100.0
  c.quadratic_bucket = 16

  # Monte Carlo.
  c.ms = (5, 20, 100)
  c.reps = 2000
  c.chunk = 250

  if a["variant"] == "smoke":
    c.synthetic_n = 256
    c.synthetic_d = (16,)
    c.taus = (8.0,)
    c.num_queries = 2
    c.snapshot = ""
    c.rff_D = (16, 128)
    c.rff_nu = (4.0,)
    c.ms = (5,)
    c.reps = 200
    c.chunk = 100
  return c
