r"""Certified top-k on synthetic Gaussian logits: measured k_eps/n vs Phi_c(sigma + Phi^-1(eps)).

Reproduces the synthetic evaluation of Tzachristas et al., "Certified Top-k attention via total variation"
(arXiv:2512.07647, Sec. 6 / 7): i.i.d. N(0, sigma^2) rows over grids of sigma and n, epsilon in {0.1, 0.05, 0.01,
0.001}; the paper states the rule, not a table, so the "paper" column is the predicted value.

    python -m experiments.run --config configs/topk/synthetic.py --workdir results/topk_synthetic
    python -m experiments.run --config configs/topk/synthetic.py:smoke --workdir /tmp/topk_syn_smoke

Time (measured, CPU, 2 cores shared with other jobs): full run 59 s (140 rows); smoke 4 s.
"""

import ml_collections

from asoftmax import configlib


# Arguments after the colon (`--config configs/topk/synthetic.py:smoke`), declared as data for `--list`.
ARGS = {"variant": configlib.choice("full", "smoke")}


def get_config(arg=None):
  a = configlib.parse_arg(arg, ARGS)
  c = ml_collections.ConfigDict()
  c.experiment = "topk_synthetic"
  c.seed = 0
  c.data_dir = configlib.default_data_dir()  # unused: synthetic data

  # Grid.
  c.sigmas = (0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 4.0)
  c.ns = (128, 512, 2048, 8192, 65536)
  c.epsilons = (0.1, 0.05, 0.01, 0.001)

  # Samples per (sigma, n): rows = max(min_rows, logits_per_cell // n).
  c.logits_per_cell = 2**18
  c.min_rows = 4

  if a["variant"] == "smoke":
    c.sigmas = (1.0, 3.0)
    c.ns = (128, 1024)
    c.epsilons = (0.1, 0.01)
    c.logits_per_cell = 2**14
  return c
