"""RF-softmax: sampled softmax with kernel-based proposals (Rawat et al., NeurIPS 2019).

Feature maps (`rff_features`, `quadratic_features`), a binary tree of feature sums with exact path
probabilities (`build_tree`, `tree_sample`, `tree_update`, `tree_log_probs`), samplers behind one
interface (`uniform_sampler`, `unigram_sampler`, `quadratic_sampler`, `rff_sampler`, `exact_sampler`), and
the full / sampled softmax losses.
"""

from asoftmax.rff.features import exact_kernel, init_rff, quadratic_features, rff_features, rff_kernel
from asoftmax.rff.loss import full_softmax_loss, sampled_softmax_loss
from asoftmax.rff.samplers import (Sampler, exact_sampler, normalize, quadratic_sampler, rff_sampler,
                                   uniform_sampler, unigram_sampler)
from asoftmax.rff.sparse_data import SparseDataset, load_sparse, precision_at_k
from asoftmax.rff.tree import KernelTree, build_tree, tree_log_probs, tree_sample, tree_update

__all__ = [
    "KernelTree", "Sampler", "build_tree", "exact_kernel", "exact_sampler", "full_softmax_loss", "init_rff",
    "normalize", "quadratic_features", "quadratic_sampler", "rff_features", "rff_kernel", "rff_sampler",
    "SparseDataset", "load_sparse", "precision_at_k", "sampled_softmax_loss", "tree_log_probs", "tree_sample", "tree_update", "uniform_sampler",
    "unigram_sampler",
]
