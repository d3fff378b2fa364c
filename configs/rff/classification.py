r"""RF-softmax classification table: teacher with a flat or Zipf class prior and two peakedness levels.

Tests RF-softmax's claim where it can hold: normalized embeddings with temperature (the paper's form), a
softmax driven by query-class geometry (flat prior, peaked) or by class frequency (Zipf prior); samplers full,
exact (oracle), unigram, uniform and RF-softmax at two D, all at m = 20 per query; a nu sweep including small
nu. Reports perplexity and precision@1/@5 (the paper's classification metric) with 95 % intervals over seeds,
ms per step, equal wall-clock, and the proposal diagnostics (KL, clamping TV, share below the RFF noise).

    nice -n 10 python -m experiments.run --config configs/rff/classification.py --workdir results/rf_classification
    python -m experiments.run --config configs/rff/classification.py:smoke --workdir /tmp/rf_cls_smoke

Time (measured, CPU, 2 cores shared with other agents' jobs, load average 6-14): full run 1,200 s (3 seeds,
87 trainings); smoke ~30 s. Table: docs/rff.md, Table 3; results: docs/results/rf_classification/.
"""

import ml_collections

from asoftmax import configlib


# Arguments after the colon (`--config configs/rff/classification.py:smoke`), declared as data for `--list`.
ARGS = {"variant": configlib.choice("full", "smoke")}


def get_config(arg=None):
  a = configlib.parse_arg(arg, ARGS)
  c = ml_collections.ConfigDict()
  c.experiment = "rf_classification"
  c.seed = 0
  c.data_dir = configlib.default_data_dir()  # unused: the teacher generates the data

  # Teacher and student.
  c.num_classes = 1024
  c.teacher_dim = 16
  c.input_dim = 32
  c.student_dim = 20  # teacher_dim + 4: room to absorb the log prior into the normalized logits
  c.priors = ("flat", "zipf")
  c.zipf_a = 1.0
  c.teacher_taus = (8.0, 16.0)  # a flat-ish and a peaked softmax (teacher top-1 prob and perplexity in the table)

  # Training (same for every sampler).
  c.steps = 600
  c.batch = 128
  c.learning_rate = 5e-2
  c.m = 20
  c.negatives = "per_query"  # or "shared": one set of m for the whole batch (batch-mixture proposal)
  c.eval_steps = (50, 100, 200, 400, 600)
  c.test_size = 8192
  c.diag_queries = 256
  c.seeds = 3

  # Samplers (the main block); RF-softmax.
  c.samplers = ("full", "exact", "unigram", "uniform", "rff")
  c.rff_D = (64, 256)
  c.rff_nu = 4.0  # kernel precision (ours: e^{nu (h.c - 1)}); see the nu sweep
  c.rff_kappa = 0.01
  c.nu_sweep = (0.25, 1.0, 2.0, 8.0, 16.0)  # nu = 4 is in the main block
  c.nu_sweep_D = 256
  c.nu_sweep_settings = (("flat", 16.0),)

  if a["variant"] == "smoke":
    c.num_classes = 128
    c.teacher_dim = 8
    c.input_dim = 8
    c.student_dim = 8
    c.priors = ("zipf",)
    c.teacher_taus = (8.0,)
    c.steps = 6
    c.batch = 16
    c.m = 5
    c.eval_steps = (3, 6)
    c.test_size = 64
    c.diag_queries = 8
    c.seeds = 2
    c.rff_D = (16,)
    c.nu_sweep = (1.0,)
    c.nu_sweep_D = 16
    c.nu_sweep_settings = (("zipf", 8.0),)
  return c
