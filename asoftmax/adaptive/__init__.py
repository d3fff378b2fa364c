"""AdaptiveSoftmax (Baharav et al., NeurIPS 2024): PAC top-k softmax by adaptive sampling.

    from asoftmax import adaptive
    prep = adaptive.prepare_matrix(A)                 # (n, d), validated once
    res = adaptive.adaptive_softmax(key, prep, X, k=1, epsilon=0.3, delta=0.1)
    ref = adaptive.softmax_topk(prep, X, k=1)         # exact reference
"""

from asoftmax.adaptive.core import (
    EXACT_BELOW,
    ORDERS,
    PHASES,
    AdaptiveConfig,
    AdaptiveResult,
    PreparedMatrix,
    adaptive_softmax,
    default_warmup,
    make_config,
    prepare_matrix,
)
from asoftmax.adaptive.exact import ExactResult, softmax_topk
from asoftmax.adaptive.synthetic import (families, gaussian_problem, heavy_tailed_problem, llm_head_problem,
                                         planted_problem, sparse_query_problem, toy_problem)
from asoftmax.adaptive.tuning import (
    TuneResult,
    conformal_fudge,
    exact_logits_batched,
    success_mask,
    tune_and_evaluate,
    tune_fudge,
)

__all__ = [
    "EXACT_BELOW", "ORDERS", "AdaptiveConfig", "AdaptiveResult", "ExactResult", "PreparedMatrix", "TuneResult", "adaptive_softmax",
    "conformal_fudge", "default_warmup", "exact_logits_batched", "gaussian_problem", "make_config", "planted_problem", "prepare_matrix",
    "softmax_topk", "success_mask", "toy_problem", "tune_and_evaluate", "tune_fudge",
    # synthetic problems used by experiments and benchmarks; the phase names of `AdaptiveResult.phase_samples`
    "PHASES", "families", "heavy_tailed_problem", "llm_head_problem", "sparse_query_problem",
]
