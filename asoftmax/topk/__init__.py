"""Certified top-k attention via total variation (Tzachristas et al., arXiv:2512.07647).

TV(P, P_hat) equals the tail mass outside the kept top-k; this package computes it, certifies it from ordered
logits or cell bounds, bounds the attention output error, and predicts k under a Gaussian model.
See `shared/papers/topk_tv.md` for the statements and their status.
"""

from asoftmax.topk.attention import AttentionOutput, certified_topk_attention, topk_probs
from asoftmax.topk.certificates import (METHODS, Bounds, CertifiedK, block_minmax, blockwise_bounds, certified_k,
                                        tail_bounds)
from asoftmax.topk.gaussian import gaussian_prediction, gaussian_tail_mass, predicted_keep_fraction, row_sigma
from asoftmax.topk.output_error import OutputError, head_mask, output_error
from asoftmax.topk.progressive import (Basis, PreparedKeys, ProgressiveResult, fit_basis,
                                       prepare_keys, progressive_search, rotate_queries)
from asoftmax.topk.search import (Cells, SearchResult, cell_upper_bounds, chunk_cells, kmeans_cells, mc_search)
from asoftmax.topk.tail import (Divergences, SortedRows, divergences, sort_rows, tail_mass, truncated_divergences,
                                tv_from_kl)

__all__ = [
    "AttentionOutput", "Basis", "Bounds", "Cells", "CertifiedK", "Divergences", "METHODS", "OutputError", "SearchResult",
    "SortedRows", "block_minmax", "blockwise_bounds", "cell_upper_bounds", "certified_k", "certified_topk_attention",
    "chunk_cells", "divergences", "gaussian_prediction", "gaussian_tail_mass", "head_mask", "kmeans_cells",
    "mc_search", "output_error", "predicted_keep_fraction", "row_sigma", "sort_rows", "tail_bounds", "tail_mass",
    "topk_probs", "truncated_divergences", "tv_from_kl", "PreparedKeys", "ProgressiveResult",
    "fit_basis", "prepare_keys", "progressive_search", "rotate_queries",
]
