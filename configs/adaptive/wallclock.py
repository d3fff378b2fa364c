r"""AdaptiveSoftmax wall-clock map: exact / adaptive time over n x d (beyond the paper; issue 24).

The paper's gaussian generator (Fig. 2b) for n in {10, 100, 1,000, 10,000} x d in {1e3, 1e4, 1e5, 1e6} (cells with
n·d > 1e8 not run: the prepared matrix holds A three times), both modes, batch 1, `exact_winners=False`, warm-up
32 (as Fig. 2); plus other d >> n problems with the default call (certified): heavy-tailed entries, a sparse
query, 1,000 arms. Rows: samples / n·d, ms adaptive, ms exact, their ratio, success over `seeds` problems.
Also run by `python scripts/bench_adaptive.py --map`.

    python -m experiments.run --config configs/adaptive/wallclock.py --workdir docs/results/adaptive_wallclock
    python -m experiments.run --config configs/adaptive/wallclock.py:smoke --workdir /tmp/wall_smoke

The committed snapshot: `--config.seeds=10` (all cells up to n·d = 1e8 and the other problems; peak ~4 GB).
Earlier full runs were killed by the OOM killer while generating the heavy-tailed 100 x 1e6 problem
(`jax.random.t` on 1e8 entries); that generator now draws large problems in row blocks by the polar method.

Time (measured, CPU, one pinned core): 17 min with seeds=10 (generating and preparing the 1e8-entry matrices dominates);
smoke ~10 s (one compiled cell).
"""

import ml_collections

from asoftmax import configlib


# Arguments after the colon (`--config configs/adaptive/wallclock.py:smoke`), declared as data for `--list`.
ARGS = {"variant": configlib.choice("full", "smoke")}


def get_config(arg=None):
  a = configlib.parse_arg(arg, ARGS)
  c = ml_collections.ConfigDict()
  c.experiment = "adaptive_wallclock"
  c.seed = 0
  c.data_dir = configlib.default_data_dir()  # unused: synthetic data

  # The map.
  c.ns = (10, 100, 1_000, 10_000)
  c.ds = (1_000, 10_000, 100_000, 1_000_000)
  c.modes = ("paper", "certified")
  c.max_products = 100_000_000  # cells with n*d above this are rows marked not run
  c.warmup = 32
  # Other d >> n problems (name, n, d), default call.
  c.problems = (("heavy_tailed", 100, 1_000_000), ("sparse_query", 100, 1_000_000), ("planted", 1_000, 100_000))

  # Protocol.
  c.epsilon = 0.3
  c.delta = 0.1
  c.seeds = 20  # distinct seeded problems per cell (success)
  c.repeats = 7  # timed calls per cell (median)

  if a["variant"] == "smoke":
    c.ns = (10, 50)
    c.ds = (1_000,)
    c.modes = ("paper",)
    c.max_products = 20_000  # the 50 x 1,000 cell is a "not run" row
    c.problems = ()
    c.seeds = 2
    c.repeats = 2
  return c
