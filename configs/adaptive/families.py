r"""AdaptiveSoftmax's guarantee on friendly and hard inputs, both modes, no tuning (beyond the paper).

For each family of `asoftmax.adaptive.synthetic.families` (planted Gaussian gap, Student-t(2.5) entries,
Student-t(3) with a planted gap, one dominant query coordinate x200, 90 % sparse query, a near tie at the k-th
place, n >> d (50,000 x 64), k = 5, warm-up 1): `problems` distinct seeded problems x `seeds` runs each, at
epsilon = 0.3 and each delta; success (top-k set right and every probability within epsilon) with a one-sided
99 % Clopper-Pearson lower bound, identification rate, gain and where the samples went. Paper mode runs with
fudge factors 1 (its theoretical radius, which the first round's default was); certified mode has no tuning.

    python -m experiments.run --config configs/adaptive/families.py --workdir results/adaptive_families
    python -m experiments.run --config configs/adaptive/families.py:smoke --workdir /tmp/fam_smoke

Time (measured, CPU, 2 cores shared with other jobs): full (40 problems x 5 seeds, 9 families, 2 modes,
delta 0.1 and 0.01) ~ see docs/results/adaptive_families/table.md; smoke < 1 min.
"""

import ml_collections

from asoftmax import configlib


# Arguments after the colon (`--config configs/adaptive/families.py:smoke`), declared as data for `--list`.
ARGS = {"variant": configlib.choice("full", "smoke")}


def get_config(arg=None):
  a = configlib.parse_arg(arg, ARGS)
  c = ml_collections.ConfigDict()
  c.experiment = "adaptive_families"
  c.seed = 0
  c.data_dir = configlib.default_data_dir()  # unused: synthetic data

  # Problems: every family at (n, d) (n_much_larger_than_d is always 50,000 x 64).
  c.families = ("gaussian_planted", "heavy_tailed", "student_t3_planted", "dominant_coordinate", "sparse_query",
                "near_tie_k3", "n_much_larger_than_d", "planted_k5", "warmup_1")
  c.n = 100
  c.d = 1000
  c.problems = 40  # distinct seeded problems per family
  c.seeds = 5  # runs (algorithm seeds) per problem

  # Algorithm.
  c.epsilon = 0.3
  c.deltas = (0.1, 0.01)
  c.modes = ("paper", "certified")

  if a["variant"] == "smoke":
    c.families = ("dominant_coordinate",)
    c.n = 20
    c.d = 100
    c.problems = 3
    c.seeds = 2
    c.deltas = (0.1,)
  return c
