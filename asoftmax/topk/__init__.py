"""Certified top-k attention via total variation (Tzachristas et al., arXiv:2512.07647).

TV(P, P_hat) equals the tail mass outside the kept top-k; this package computes it, certifies it from ordered
logits or cell bounds, bounds the attention output error, and predicts k under a Gaussian model.
Reference: Tzachristas et al., "Certified Top-k Attention via Total Variation", arXiv:2512.07647.

Public API: the names in this package's `__all__` (the one list; modules hold the code and are imported from here,
as in optax). `asoftmax.topk._core` holds the traceable internals the modules share; it is not part of the API. The
tail mass is always called `tail_mass` in code (`tau` is the rff inverse temperature).

Input contract (issue 14): every public function raises `ValueError` naming the argument on invalid input; under
`jax.jit`, where array values cannot be checked, invalid rows are flagged in the result (k = 0 and a NaN
certificate / tail mass; see each docstring). bfloat16 and float16 are accepted and computed in float32.
"""

from asoftmax.topk.attention import AttentionOutput, TruncatedProbs, certified_topk_attention, topk_probs
from asoftmax.topk.certificates import (METHODS, BlockStats, Bounds, CertifiedHead, CertifiedK, TailInterval,
                                        block_minmax, blockwise_bounds, certified_k, tail_bounds)
from asoftmax.topk.decode import ThresholdHeads, threshold_heads, threshold_topk_probs
from asoftmax.topk.dot_product import AttentionCertificate, dot_product_attention
from asoftmax.topk.gaussian import gaussian_prediction, gaussian_tail_mass, predicted_keep_fraction, row_sigma
from asoftmax.topk.output_error import OutputError, head_mask, output_error
from asoftmax.topk.progressive import (Basis, PreparedKeys, ProgressiveResult, fit_basis,
                                       prepare_keys, progressive_search, rotate_queries)
from asoftmax.topk.search import (Cells, SearchResult, cell_upper_bounds, chunk_cells, kmeans_cells, mc_search)
from asoftmax.topk.sketch import KeySketch, SketchResult, build_key_sketch, sketch_bounds, sketch_bytes, sketch_search
from asoftmax.topk.tail import (Divergences, SortedRows, divergences, sort_rows, tail_mass, truncated_divergences,
                                tv_from_kl)

__all__ = [
    "AttentionOutput", "Basis", "BlockStats", "Bounds", "Cells", "CertifiedHead", "CertifiedK", "Divergences",
    "METHODS", "OutputError", "SearchResult", "SortedRows", "TailInterval", "TruncatedProbs", "block_minmax",
    "blockwise_bounds", "cell_upper_bounds", "certified_k", "certified_topk_attention", "chunk_cells",
    "divergences", "gaussian_prediction", "gaussian_tail_mass", "head_mask", "kmeans_cells", "mc_search",
    "output_error", "predicted_keep_fraction", "row_sigma", "sort_rows", "tail_bounds", "tail_mass", "topk_probs",
    "truncated_divergences", "tv_from_kl", "PreparedKeys", "ProgressiveResult", "fit_basis", "prepare_keys",
    "progressive_search", "rotate_queries", "ThresholdHeads", "threshold_heads", "threshold_topk_probs",
    "AttentionCertificate", "dot_product_attention",
    # Issue 28: certified decode attention from a quantized key sketch.
    "KeySketch", "SketchResult", "build_key_sketch", "sketch_bounds", "sketch_bytes", "sketch_search",
]
