r"""A small word-level LSTM language model with a normalized output layer (for RF-softmax experiments).

tokens [B, T] -> embedding -> one LSTM layer -> linear -> query h [B, T, d]; class vectors C [n, d].
Logits are $\tau \hat h^\top \hat c_i$ (unit-normalized h and c, inverse temperature tau), as in
Rawat et al., NeurIPS 2019, Sec. 2; the loss (full or sampled softmax) is applied by the caller
(`asoftmax.rff.full_softmax_loss` / `sampled_softmax_loss`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


class WordLSTM(nnx.Module):
  """Embedding -> LSTM -> linear query; class vectors as a separate parameter.

  Args:
    vocab: n, number of words (classes).
    embed: embedding size. hidden: LSTM size. dim: d, query / class-vector size.
    rngs: nnx.Rngs.
  """

  def __init__(self, vocab: int, embed: int, hidden: int, dim: int, *, rngs: nnx.Rngs):
    self.embed = nnx.Embed(vocab, embed, rngs=rngs)
    self.rnn = nnx.RNN(nnx.OptimizedLSTMCell(embed, hidden, rngs=rngs))
    self.proj = nnx.Linear(hidden, dim, rngs=rngs)
    self.classes = nnx.Param(jax.random.normal(rngs.params(), (vocab, dim)) / jnp.sqrt(dim))

  def __call__(self, tokens: jax.Array) -> jax.Array:
    """tokens [B, T] int32 -> queries [B, T, d] (unnormalized; losses normalize)."""
    return self.proj(self.rnn(self.embed(tokens)))


class FeatureHead(nnx.Module):
  """A new output layer on frozen features: linear projection to the query, normalized class vectors.

  features [..., d_in] -> query h [..., d] = features @ W + b; class vectors C [n, d]. Logits are
  $\\tau \\hat h^\\top \\hat c_i$ as for `WordLSTM` (the loss normalizes). Used for the RF-softmax
  table's 49,152-way layer trained on frozen SmolLM2 hidden states.

  Args:
    num_classes: n. in_features: d_in (576 for SmolLM2). dim: d, query / class-vector size.
    rngs: nnx.Rngs.
  """

  def __init__(self, num_classes: int, in_features: int, dim: int, *, rngs: nnx.Rngs):
    self.proj = nnx.Linear(in_features, dim, rngs=rngs)
    self.classes = nnx.Param(jax.random.normal(rngs.params(), (num_classes, dim)) / jnp.sqrt(dim))

  def __call__(self, features: jax.Array) -> jax.Array:
    """features [..., d_in] float -> queries [..., d] (unnormalized)."""
    return self.proj(features.astype(jnp.float32))
