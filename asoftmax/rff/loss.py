r"""Full and sampled softmax losses over normalized embeddings (usable inside an optax step).

Logits are $o_i = \tau \hat h^\top \hat c_i$ with $\hat x = x/\|x\|$ (Rawat et al., NeurIPS 2019, Sec. 2).
Sampled softmax with the log-q correction (the paper's form; the true logit is left uncorrected):

  $L' = -o_t + \log\big(e^{o_t} + \sum_{j=1}^m e^{o_{s_j} - \log(m q_{s_j})}\big)$,

with accidental hits ($s_j = t$) masked to $-\infty$, so $\sum_j e^{o_{s_j}}/(m q_{s_j})$ is an unbiased estimate
of $Z_t = \sum_{i \ne t} e^{o_i}$ (`shared/papers/rf_softmax.md` Sec. 2). q is treated as a constant.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike


def _norm(x):
  return x / jnp.sqrt(jnp.sum(x * x, -1, keepdims=True) + 1e-12)


def full_softmax_loss(h: ArrayLike, class_vectors: ArrayLike, targets: ArrayLike, tau: float) -> jax.Array:
  r"""Per-example cross-entropy $-o_t + \log\sum_i e^{o_i}$.

  Args:
    h: [B, d] queries (normalized here). class_vectors: [n, d] (rows normalized here).
    targets: [B] int class ids. tau: inverse temperature.

  Returns:
    [B] float32 losses.
  """
  logits = tau * _norm(h) @ _norm(class_vectors).T
  return jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, targets[:, None], 1)[:, 0]


def sampled_softmax_loss(h: ArrayLike, class_vectors: ArrayLike, targets: ArrayLike, ids: ArrayLike,
                         log_q: ArrayLike, tau: float) -> jax.Array:
  r"""Per-example sampled softmax loss with log-q correction and accidental-hit masking.

  Args:
    h: [B, d] queries (normalized here). class_vectors: [n, d] (gathered rows normalized here).
    targets: [B] int true classes. ids: [B, m] sampled classes (with replacement).
    log_q: [B, m] log proposal probabilities of `ids` (stop-gradient applied). tau: inverse temperature.

  Returns:
    [B] float32 losses $L'$ (see module docstring).

  Example:
    >>> ids, log_q = sampler.sample(state, key, normalize(h), m=100)
    >>> loss = sampled_softmax_loss(h, C, t, ids, log_q, tau=10.).mean()
  """
  hn = _norm(h)
  o_t = tau * jnp.sum(hn * _norm(class_vectors[targets]), -1)
  o_s = tau * jnp.einsum("bd,bmd->bm", hn, _norm(class_vectors[ids]))
  m = ids.shape[1]
  adj = o_s - jax.lax.stop_gradient(log_q) - jnp.log(float(m))
  adj = jnp.where(ids == targets[:, None], -jnp.inf, adj)
  logits = jnp.concatenate([o_t[:, None], adj], 1)
  return jax.nn.logsumexp(logits, 1) - o_t
