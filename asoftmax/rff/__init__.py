"""RF-softmax: sampled softmax with kernel-based proposals (Rawat et al., NeurIPS 2019).

Feature maps (`rff_features`, `quadratic_features`), a binary tree of feature sums with exact path
probabilities (`build_tree`, `tree_sample`, `tree_update`, `tree_log_probs`), samplers behind one
interface (`uniform_sampler`, `unigram_sampler`, `quadratic_sampler`, `rff_sampler`, `rff_bucket_sampler` (leaves
holding buckets of classes, scored exactly when drawn), `exact_sampler`; per
query or batch-shared), negatives with or without replacement (`draw_negatives`, TF's expected counts), and
the full / sampled softmax losses (`sampled_softmax_loss`, `corrected_sampled_loss` with TF's conventions), and
the bias of a proposal's sampled-softmax gradient (`gradient_bias`, `distribution_metrics`).
"""

from asoftmax.rff.bias import DistributionMetrics, GradientBias, distribution_metrics, gradient_bias
from asoftmax.rff.features import exact_kernel, init_rff, quadratic_features, rff_features, rff_kernel
from asoftmax.rff.loss import (corrected_sampled_loss, cosine_logit_fn, full_softmax_loss, linear_logit_fn,
                               sampled_logits, sampled_softmax_loss)
from asoftmax.rff.negatives import Negatives, draw_negatives, expected_count
from asoftmax.rff.samplers import (Sampler, exact_sampler, normalize, quadratic_sampler, refresh, rff_sampler,
                                   uniform_sampler, unigram_sampler)
from asoftmax.rff.samplers import rff_bucket_sampler
from asoftmax.rff.sparse_data import SparseDataset, load_sparse, precision_at_k
from asoftmax.rff.tree import (KernelTree, build_tree, leaf_clamped_log_probs, tree_log_probs, tree_nbytes,
                               tree_sample, tree_update)

__all__ = [
    "DistributionMetrics", "GradientBias", "KernelTree", "Negatives", "Sampler", "SparseDataset",
    "build_tree", "corrected_sampled_loss", "distribution_metrics", "draw_negatives", "exact_kernel",
    "exact_sampler", "expected_count", "full_softmax_loss", "gradient_bias", "init_rff",
    "leaf_clamped_log_probs", "load_sparse", "normalize", "precision_at_k", "quadratic_features",
    "quadratic_sampler", "rff_features", "rff_kernel", "rff_sampler", "sampled_softmax_loss",
    "tree_log_probs", "tree_sample", "tree_update", "uniform_sampler", "unigram_sampler",
    "cosine_logit_fn", "linear_logit_fn", "refresh", "sampled_logits",
    "rff_bucket_sampler", "tree_nbytes",
]
