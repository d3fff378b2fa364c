r"""RF-softmax time-to-accuracy (issue 27): held-out P@1 / P@5 / perplexity against training wall-clock.

A generative teacher with n classes (flat or Zipf prior, peaked posterior), a normalized student with temperature,
trained with the full softmax and with batch-shared sampled softmax (exact oracle, unigram, uniform, RF-softmax
with the bucketed tree at several D; per-query negatives for a subset). Reports, per sampler, the time to 90 % /
95 % of the full softmax's final P@1 over 3 seeds; plots every curve against wall-clock and steps.

    # n = 1e5 (the committed snapshot docs/results/rf_time_to_accuracy/):
    nice -n 10 python -m experiments.run --config configs/rff/time_to_accuracy.py:n1e5 --workdir results/rf_tta_1e5
    # n = 1e6 (Zipf prior only, fewer checkpoints):
    nice -n 10 python -m experiments.run --config configs/rff/time_to_accuracy.py:n1e6 --workdir results/rf_tta_1e6
    python -m experiments.run --config configs/rff/time_to_accuracy.py:smoke --workdir /tmp/rf_tta_smoke

Time: see docs/rff.md ("Time to accuracy"); smoke ~20 s.
"""

import ml_collections

from asoftmax import configlib


# Arguments after the colon (`--config configs/rff/time_to_accuracy.py:smoke`), declared as data for `--list`.
ARGS = {"variant": configlib.choice("n1e5", "n1e6", "smoke")}


def get_config(arg=None):
  a = configlib.parse_arg(arg, ARGS)
  c = ml_collections.ConfigDict()
  c.experiment = "rf_time_to_accuracy"
  c.seed = 0
  c.data_dir = configlib.default_data_dir()  # unused: the teacher generates the data

  # Teacher and student.
  c.num_classes = 100_000
  c.dim = 64
  c.sigma = 0.3  # x = c*_y + sigma N(0, I): posterior temperature 1/sigma^2
  c.priors = ("zipf", "flat")
  c.zipf_a = 1.0
  c.extra_student_dims = 4

  # Training: budgets per run (a run stops at its step cap or its time budget).
  c.batch = 128
  c.m = 100
  c.lr_w = 1e-2
  c.lr_c = 0.5
  c.full_steps = 2000
  c.full_budget_s = 120.0
  c.sampled_steps = 10000
  c.sampled_budget_s = 20.0
  c.checkpoints = 8
  c.first_checkpoint = 10
  c.test_size = 1024
  c.eval_block = 128
  c.seeds = 3
  c.unigram_count_samples = 100_000

  # Samplers.
  c.samplers = ("full", "exact", "unigram", "uniform", "rff_bucket")
  c.negatives = ("shared",)
  c.per_query_samplers = ("unigram", "rff_bucket")
  c.rff_D = (64, 256, 1024)
  c.per_query_D = (64,)  # RF D values also run with per-query negatives
  c.rff_bucket = 16
  c.rff_nu = 4.0
  c.rff_kappa = 0.01

  if a["variant"] == "smoke":
    c.num_classes = 512
    c.dim = 8
    c.priors = ("zipf",)
    c.batch = 16
    c.m = 8
    c.full_steps = 6
    c.sampled_steps = 8
    c.checkpoints = 3
    c.first_checkpoint = 2
    c.test_size = 64
    c.eval_block = 32
    c.seeds = 2
    c.unigram_count_samples = 1000
    c.rff_D = (8,)
    c.rff_bucket = 4
    c.negatives = ("shared", "per_query")
    c.samplers = ("full", "rff_bucket")
    c.per_query_samplers = ("rff_bucket",)
    c.per_query_D = (8,)
  elif a["variant"] == "n1e6":
    c.num_classes = 1_000_000
    c.priors = ("zipf",)
    c.full_steps = 200
    c.full_budget_s = 120.0
    c.sampled_budget_s = 20.0
    c.checkpoints = 5
    c.test_size = 1024
    c.eval_block = 64
    c.rff_bucket = 32
    c.rff_D = (1024,)
    c.samplers = ("full", "unigram", "uniform", "rff_bucket")
    c.per_query_samplers = ()
    c.per_query_D = ()
  return c
