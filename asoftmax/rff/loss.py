r"""Full and sampled softmax losses over normalized embeddings (usable inside an optax step).

Logits are $o_i = \tau \hat h^\top \hat c_i$ with $\hat x = x/\|x\|$ (Rawat et al., NeurIPS 2019, Sec. 2).
Sampled softmax with the log-q correction (the paper's form; the true logit is left uncorrected):

  $L' = -o_t + \log\big(e^{o_t} + \sum_{j=1}^m e^{o_{s_j} - \log(m q_{s_j})}\big)$,

with accidental hits ($s_j = t$) masked to $-\infty$, so $\sum_j e^{o_{s_j}}/(m q_{s_j})$ is an unbiased estimate
of $Z_t = \sum_{i \ne t} e^{o_i}$ (Rawat et al., "Sampled Softmax with Random Fourier Features",
NeurIPS 2019, Sec. 2). q is treated as a constant.

**Conventions against TensorFlow** (`tf.nn.sampled_softmax_loss`, `_compute_sampled_logits`):

* TF subtracts $\log E_t$ (the true class's expected count, $m q_t$ with replacement) from the **true** logit as
  well, by default (`subtract_log_q=True`); the paper's form above does not. `corrected_sampled_loss(...,
  log_expected_true=...)` gives TF's form; with `log_expected_true=None` (the default) the true logit is left
  alone. TF with `true_expected_count = 1` equals ours.
* TF masks only the **last** occurrence of a true class sampled several times (`compute_accidental_hits` keeps
  one position per sampled id, the last one written to a hash map); we mask **all** of them by default
  (`accidental_hits="all"`), which is what keeps the estimate of $Z_t$ unbiased when sampling with replacement.
  `accidental_hits="last"` reproduces TF. Without replacement (`negatives.py`, `unique=True`) the two agree.
* TF divides by the expected count $E_s$, which is $m q_s$ with replacement and
  $1 - (1 - q_s)^{T}$ (T = number of tries needed to collect m distinct classes) without; both are taken
  here as `log_expected` (see `negatives.expected_count`).

Both per-query negatives (ids [B, m], the paper's form) and batch-shared negatives (ids [m], one set for the
whole batch as in TF) are accepted; the shared form needs only m class rows (a [B, d] x [d, m] matmul).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from asoftmax import checks


def _norm(x):
  return x / jnp.sqrt(jnp.sum(x * x, -1, keepdims=True) + 1e-12)


def _check_common(h, class_vectors, targets, tau):
  """h [B, d], class_vectors [n, d] finite floating; targets [B] ids in [0, n); tau > 0. Returns tau."""
  checks.floating_array("h", h, 2)
  checks.floating_array("class_vectors", class_vectors, 2)
  checks.same_dim("class_vectors", class_vectors, h.shape[1], "h")
  checks.index_array("targets", targets, class_vectors.shape[0], 1)
  if targets.shape[0] != h.shape[0]:
    raise ValueError(f"targets must have shape ({h.shape[0]},) (one per row of h), got {targets.shape}")
  return checks.positive("tau", tau)


def _flag_ids(loss, n, targets, ids=None):
  """The jit validity flag: NaN loss for a row with an id outside [0, n) (gathers would clamp it silently)."""
  bad = (targets < 0) | (targets >= n)
  if ids is not None:
    out = (ids < 0) | (ids >= n)
    bad = bad | (out.any(-1) if ids.ndim == 2 else out.any())
  return jnp.where(bad, jnp.nan, loss)


def full_softmax_loss(h: ArrayLike, class_vectors: ArrayLike, targets: ArrayLike, tau: float) -> jax.Array:
  r"""Per-example cross-entropy $-o_t + \log\sum_i e^{o_i}$.

  Args:
    h: [B, d] queries (normalized here). class_vectors: [n, d] (rows normalized here).
    targets: [B] int class ids. tau: inverse temperature.

  Returns:
    [B] float32 losses (NaN, the jit validity flag, for a row whose target is out of range under `jax.jit`).
  """
  tau = _check_common(h, class_vectors, targets, tau)
  return _full_softmax_loss(h, class_vectors, targets, tau)


@jax.jit
def _full_softmax_loss(h, class_vectors, targets, tau):
  """`full_softmax_loss` after its checks: one compiled program per shape (called eagerly, its dozen operations
  would each compile at every new shape)."""
  logits = tau * _norm(h) @ _norm(class_vectors).T
  loss = jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, targets[:, None], 1)[:, 0]
  return _flag_ids(loss, class_vectors.shape[0], targets)


def corrected_sampled_loss(h: ArrayLike, class_vectors: ArrayLike, targets: ArrayLike, ids: ArrayLike,
                           log_expected: ArrayLike, tau: float, *, log_expected_true: ArrayLike | None = None,
                           accidental_hits: str = "all") -> jax.Array:
  r"""Per-example sampled softmax loss given the log expected count of each sampled class.

  $L = -x_0 + \log\big(e^{x_0} + \sum_j e^{x_j}\big)$ with $x_0 = o_t - \log E_t$ (or $o_t$ when
  `log_expected_true` is None) and $x_j = o_{s_j} - \log E_{s_j}$, $-\infty$ for masked accidental hits.
  Expected counts get stop-gradient.

  Args:
    h: [B, d] queries (normalized here). class_vectors: [n, d] (gathered rows normalized here).
    targets: [B] int true classes.
    ids: [B, m] per-query or [m] batch-shared sampled classes.
    log_expected: log expected count of each sampled class, broadcastable to [B, m] (log(m q) with
      replacement; +inf masks an entry).
    tau: inverse temperature.
    log_expected_true: optional [B] log expected count of each true class (TF's default subtracts it; the
      paper does not).
    accidental_hits: "all" masks every sampled position equal to the true class (ours, unbiased with
      replacement); "last" masks only the last such position (TF's `compute_accidental_hits`); "none".

  Returns:
    [B] float32 losses.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from asoftmax.rff import normalize
    >>> C = normalize(jax.random.normal(jax.random.key(0), (50, 8)))
    >>> h, t = C[:4], jnp.arange(4)
    >>> ids = jnp.arange(10, 20)  # one batch-shared set of m = 10 classes, each with q = 1/50
    >>> corrected_sampled_loss(h, C, t, ids, jnp.log(10 / 50), 5.0).shape
    (4,)
  """
  if accidental_hits not in ("all", "last", "none"):
    raise ValueError(f"accidental_hits must be 'all', 'last' or 'none', got {accidental_hits!r}")
  tau = _check_common(h, class_vectors, targets, tau)
  checks.index_array("ids", ids, class_vectors.shape[0], (1, 2))
  if jnp.ndim(ids) == 2 and ids.shape[0] != h.shape[0]:
    raise ValueError(f"ids must have shape [m] (shared) or [B, m] (per query) with B = {h.shape[0]}, got {ids.shape}")
  o_shape = (h.shape[0], ids.shape[-1])
  checks.floating_array("log_expected", log_expected, None, finite=False)
  try:
    np.broadcast_shapes(tuple(jnp.shape(log_expected)), o_shape)
  except ValueError:
    raise ValueError(f"log_expected of shape {jnp.shape(log_expected)} does not broadcast to {o_shape}") from None
  _no_nan_or_neginf("log_expected", log_expected)
  if log_expected_true is not None:
    checks.floating_array("log_expected_true", log_expected_true, 1)
  return _corrected_sampled_loss(h, class_vectors, targets, ids, log_expected, tau, log_expected_true,
                                 accidental_hits)


@functools.partial(jax.jit, static_argnames=("accidental_hits",))
def _corrected_sampled_loss(h, class_vectors, targets, ids, log_expected, tau, log_expected_true, accidental_hits):
  """`corrected_sampled_loss` after its checks, one compiled program per shape (as `_full_softmax_loss`)."""
  hn = _norm(h)
  o_t = tau * jnp.sum(hn * _norm(class_vectors[targets]), -1)
  if ids.ndim == 1:
    o_s = tau * hn @ _norm(class_vectors[ids]).T  # [B, m]
  else:
    o_s = tau * jnp.einsum("bd,bmd->bm", hn, _norm(class_vectors[ids]))
  m = ids.shape[-1]
  adj = o_s - jax.lax.stop_gradient(jnp.broadcast_to(log_expected, o_s.shape))
  hit = jnp.broadcast_to(ids, o_s.shape) == targets[:, None]
  if accidental_hits == "last":
    last = jnp.max(jnp.where(hit, jnp.arange(m), -1), -1)
    hit = hit & (jnp.arange(m) == last[:, None])
  if accidental_hits != "none":
    adj = jnp.where(hit, -jnp.inf, adj)
  x0 = o_t if log_expected_true is None else o_t - jax.lax.stop_gradient(log_expected_true)
  logits = jnp.concatenate([x0[:, None], adj], 1)
  return _flag_ids(jax.nn.logsumexp(logits, 1) - x0, class_vectors.shape[0], targets, ids)


def _no_nan_or_neginf(name, x):
  """log expected counts: +inf masks an entry; NaN and -inf (an expected count of 0) are invalid when concrete."""
  if checks.is_traced(x):
    return
  a = np.asarray(x, np.float32)
  if np.isnan(a).any() or np.isneginf(a).any():
    raise ValueError(f"{name} contains NaN or -inf (a log expected count must be finite, or +inf to mask)")


def sampled_softmax_loss(h: ArrayLike, class_vectors: ArrayLike, targets: ArrayLike, ids: ArrayLike,
                         log_q: ArrayLike, tau: float) -> jax.Array:
  r"""Per-example sampled softmax loss with log-q correction and accidental-hit masking (paper's form).

  The m classes are drawn i.i.d. with replacement, so the expected count is $m q$; the true logit is left
  uncorrected and every accidental hit is masked (see the module docstring for TF's conventions).

  Args:
    h: [B, d] queries (normalized here). class_vectors: [n, d] (gathered rows normalized here).
    targets: [B] int true classes. ids: [B, m] per-query or [m] batch-shared sampled classes.
    log_q: log proposal probabilities of `ids`, same shape (stop-gradient applied). tau: inverse temperature.

  Returns:
    [B] float32 losses $L'$ (see module docstring).

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from asoftmax.rff import normalize, uniform_sampler
    >>> C = normalize(jax.random.normal(jax.random.key(0), (50, 8)))
    >>> h, t = C[:4], jnp.arange(4)
    >>> s = uniform_sampler(50)
    >>> ids, log_q = s.sample(s.init(), jax.random.key(1), h, 10)  # [4, 10] per query
    >>> sampled_softmax_loss(h, C, t, ids, log_q, tau=5.0).shape
    (4,)
  """
  checks.floating_array("log_q", log_q, (1, 2), finite=False)
  _no_nan_or_neginf("log_q", log_q)
  if jnp.shape(log_q) != jnp.shape(ids):
    raise ValueError(f"log_q must have the shape of ids {jnp.shape(ids)}, got {jnp.shape(log_q)}")
  if not checks.is_traced(log_q) and np.isposinf(np.asarray(log_q, np.float32)).any():
    raise ValueError("log_q contains +inf (a log probability is <= 0)")
  m = jnp.shape(ids)[-1]
  return corrected_sampled_loss(h, class_vectors, targets, ids, jnp.asarray(log_q) + jnp.log(float(m)), tau)


# ------------------------------------------------------------------------------------------- optax-style logits
def cosine_logit_fn(class_vectors: ArrayLike, tau: float):
  r"""Logit function $o_i = \tau \hat h^\top \hat c_i$ (the paper's normalized logits) for `sampled_logits`.

  Args:
    class_vectors: [n, d] class table (rows normalized when gathered). tau: inverse temperature (> 0).

  Returns:
    `logit_fn(h, class_ids)`: h [B, d]; class_ids [k] (shared) or [B, k] (per query) -> [B, k] logits.
  """
  checks.floating_array("class_vectors", class_vectors, 2)
  tau = checks.positive("tau", tau)
  C = jnp.asarray(class_vectors)

  def logit_fn(h, class_ids):
    hn = _norm(h)
    if class_ids.ndim == 1:
      return tau * hn @ _norm(C[class_ids]).T
    return tau * jnp.einsum("bd,bkd->bk", hn, _norm(C[class_ids]))

  return logit_fn


def linear_logit_fn(kernel: ArrayLike, bias: ArrayLike | None = None):
  r"""Logit function of an unnormalised linear head $o_i = h^\top W_{:, i} + b_i$ for `sampled_logits`.

  Args:
    kernel: [d, n] (flax's `nnx.Linear(d, n).kernel` layout: one column per class). bias: optional [n].

  Returns:
    `logit_fn(h, class_ids)`: h [B, d]; class_ids [k] (shared) or [B, k] (per query) -> [B, k] logits. Only the
    k gathered columns are read (a [B, d] x [d, k] product for shared ids).
  """
  checks.floating_array("kernel", kernel, 2)
  W = jnp.asarray(kernel)
  if bias is not None:
    checks.floating_array("bias", bias, 1)
    if bias.shape[0] != W.shape[1]:
      raise ValueError(f"bias must have shape ({W.shape[1]},) (one per class column of kernel), got {bias.shape}")
  b = None if bias is None else jnp.asarray(bias)

  def logit_fn(h, class_ids):
    if class_ids.ndim == 1:
      o = h @ W[:, class_ids]
    else:
      o = jnp.einsum("bd,dbk->bk", h, W[:, class_ids])
    return o if b is None else o + b[class_ids]

  return logit_fn


def sampled_logits(logit_fn, h: ArrayLike, targets: ArrayLike, ids: ArrayLike, log_expected: ArrayLike, *,
                   log_expected_true: ArrayLike | None = None, accidental_hits: str = "all") -> jax.Array:
  r"""Sampled-softmax logits [B, 1 + m] (true class first) for any logit function: an optax-style sampled loss.

  `optax.softmax_cross_entropy_with_integer_labels(sampled_logits(...), zeros)` is the sampled softmax loss
  $L = -x_0 + \log(e^{x_0} + \sum_j e^{x_j})$ of `corrected_sampled_loss` (the paper's form, Rawat et al.,
  NeurIPS 2019, Sec. 2; TF's conventions in the module docstring), for whatever `logit_fn` computes: a bias, an
  unnormalised linear head (`linear_logit_fn`), the paper's cosine logits (`cosine_logit_fn`):

  * column 0: $x_0 = o_t$ (minus `log_expected_true` if given, TF's default);
  * column j: $x_j = o_{s_j} - \log E_{s_j}$ (log q correction; $E = m q$ with replacement, see
    `negatives.expected_count` without), $-\infty$ where $s_j$ is an accidental hit (the true class).

  Expected counts get stop-gradient; gradients reach only the true and sampled classes' parameters.

  Args:
    logit_fn: `logit_fn(h, class_ids) -> [B, k]` for class_ids [k] (batch-shared) or [B, k] (per query); called
      with `targets[:, None]` and with `ids`.
    h: [B, d] the model's features (passed to logit_fn as they are; normalise them for the sampler only).
    targets: [B] int true classes.
    ids: [B, m] per-query or [m] batch-shared sampled classes (e.g. `sampler.sample(...)`, `draw_negatives`).
    log_expected: log expected count of each sampled class, broadcastable to [B, m] (`log_q + log(m)` for
      i.i.d. draws; +inf masks an entry).
    log_expected_true: optional [B] (TF's correction of the true logit). accidental_hits: "all", "last", "none"
      (as in `corrected_sampled_loss`).

  Returns:
    [B, 1 + m] logits; the label of every row is 0. A NaN log expected count (possible only under `jax.jit`)
    gives NaN logits (the project's jit flag).

  Example:
    >>> import optax
    >>> C = jax.random.normal(jax.random.key(0), (50, 8))
    >>> h, t = C[:4] * 2.0, jnp.arange(4)
    >>> ids = jnp.arange(10, 20)  # one batch-shared set of m = 10 classes, q = 1/50 each
    >>> logits = sampled_logits(linear_logit_fn(C.T), h, t, ids, jnp.log(10 / 50))
    >>> optax.softmax_cross_entropy_with_integer_labels(logits, jnp.zeros(4, int)).shape
    (4,)
  """
  if not callable(logit_fn):
    raise ValueError(f"logit_fn must be a function (h, class_ids) -> logits, got {type(logit_fn).__name__}")
  if accidental_hits not in ("all", "last", "none"):
    raise ValueError(f"accidental_hits must be 'all', 'last' or 'none', got {accidental_hits!r}")
  checks.floating_array("h", h, 2)
  checks.int_array("targets", targets, 0, shape=(h.shape[0],))
  checks.int_array("ids", ids, 0)
  if jnp.ndim(ids) not in (1, 2) or (jnp.ndim(ids) == 2 and ids.shape[0] != h.shape[0]):
    raise ValueError(f"ids must have shape [m] (shared) or [B, m] (per query) with B = {h.shape[0]}, "
                     f"got {jnp.shape(ids)}")
  o_shape = (h.shape[0], jnp.shape(ids)[-1])
  checks.floating_array("log_expected", log_expected, None, finite=False)
  try:
    np.broadcast_shapes(tuple(jnp.shape(log_expected)), o_shape)
  except ValueError:
    raise ValueError(f"log_expected of shape {jnp.shape(log_expected)} does not broadcast to {o_shape}") from None
  _no_nan_or_neginf("log_expected", log_expected)
  if log_expected_true is not None:
    checks.floating_array("log_expected_true", log_expected_true, 1)
  h, targets, ids = jnp.asarray(h), jnp.asarray(targets), jnp.asarray(ids)
  o_t = logit_fn(h, targets[:, None])
  o_s = logit_fn(h, ids)
  for name, o, shape in (("true", o_t, (h.shape[0], 1)), ("sampled", o_s, o_shape)):
    if tuple(jnp.shape(o)) != shape:
      raise ValueError(f"logit_fn must return [B, k] logits for class_ids [B, k] or [k]; for the {name} classes "
                       f"it returned shape {tuple(jnp.shape(o))}, expected {shape}")
  m = o_shape[1]
  adj = o_s - jax.lax.stop_gradient(jnp.broadcast_to(jnp.asarray(log_expected, o_s.dtype), o_shape))
  hit = jnp.broadcast_to(ids, o_shape) == targets[:, None]
  if accidental_hits == "last":
    last = jnp.max(jnp.where(hit, jnp.arange(m), -1), -1)
    hit = hit & (jnp.arange(m) == last[:, None])
  if accidental_hits != "none":
    adj = jnp.where(hit, -jnp.inf, adj)
  x0 = o_t[:, 0]
  if log_expected_true is not None:
    x0 = x0 - jax.lax.stop_gradient(jnp.asarray(log_expected_true, x0.dtype))
  return jnp.concatenate([x0[:, None], adj], 1)
