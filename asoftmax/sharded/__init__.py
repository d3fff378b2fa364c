"""Scale-out on `jax.sharding`: the three methods on a device mesh (vocab-, class- and sequence-sharded).

Every primitive is a `jax.shard_map` over a user-supplied `jax.sharding.Mesh` (`make_mesh` builds one); the
sharded dimension need not divide the axis size (padding is masked). See README "Scale-out".

    from asoftmax import sharded
    mesh = sharded.make_mesh((8,), ("vocab",))
    ref = sharded.softmax_topk(A, X, mesh, k=5)          # exact, ids equal one device's
"""

from asoftmax.sharded._mesh import make_mesh
from asoftmax.sharded.adaptive import ShardedAdaptiveResult, ShardedMatrix, adaptive_softmax, prepare_matrix
from asoftmax.sharded.attention import (ShardedAttention, ShardedProgressive, progressive_attention,
                                        threshold_attention)
from asoftmax.sharded.exact import logsumexp, softmax_topk
from asoftmax.sharded.rff import ShardedTree, build_tree, sampled_softmax_loss, tree_log_probs, tree_sample

__all__ = ["ShardedAdaptiveResult", "ShardedAttention", "ShardedProgressive", "progressive_attention", "ShardedMatrix", "adaptive_softmax", "prepare_matrix",
            "logsumexp", "make_mesh", "softmax_topk", "threshold_attention",
           "ShardedTree", "build_tree", "sampled_softmax_loss", "tree_log_probs", "tree_sample"]
