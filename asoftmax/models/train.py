"""Generic optax training for the image classifiers in `asoftmax.models.cnn`, feature extraction, and
safetensors caching of trained weights (so a second run skips training).

    model = cnn.MnistCNN(rngs=nnx.Rngs(0))
    hist = train_classifier(model, x_train, y_train, epochs=2, batch_size=128, learning_rate=1e-3, seed=0)
    acc = accuracy(model, x_test, y_test)
    X = extract_features(model, x_test[:1000])      # (1000, d) float32: the AdaptiveSoftmax queries
    A = np.asarray(model.head_matrix())             # (10, d): the AdaptiveSoftmax matrix
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import warnings
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from asoftmax import checks, results


def _loss(model, images, labels):
  logits = model(images, train=True)
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


@nnx.jit
def _train_step(model, optimizer, images, labels):
  loss, grads = nnx.value_and_grad(_loss)(model, images, labels)
  optimizer.update(model, grads)
  return loss


@nnx.jit
def _logits(model, images):
  return model(images)


@nnx.jit
def _features(model, images):
  return model.features(images)


def _flip_augment(rng: np.random.Generator, images: np.ndarray) -> np.ndarray:
  """Random horizontal and vertical flips (for overhead imagery such as EuroSAT)."""
  images = images.copy()
  h = rng.random(len(images)) < 0.5
  v = rng.random(len(images)) < 0.5
  images[h] = images[h][:, :, ::-1]
  images[v] = images[v][:, ::-1]
  return images


def _rot90_augment(rng: np.random.Generator, images: np.ndarray) -> np.ndarray:
  """Random rotations by 0/90/180/270 degrees (square images)."""
  images = images.copy()
  k = rng.integers(0, 4, len(images))
  for r in (1, 2, 3):
    images[k == r] = np.rot90(images[k == r], r, axes=(1, 2))
  return images


def _dihedral_augment(rng: np.random.Generator, images: np.ndarray) -> np.ndarray:
  """Random flips and rotations by multiples of 90 degrees (the 8 symmetries of a square, for overhead imagery)."""
  return _rot90_augment(rng, _flip_augment(rng, images))


def train_classifier(model: nnx.Module, x_train: np.ndarray, y_train: np.ndarray, *, epochs: float = 1.0,
                     batch_size: int = 128, learning_rate: float = 1e-3, weight_decay: float = 0.0,
                     seed: int = 0, max_steps: int | None = None, augment_flips: bool = False,
                     augment_rot90: bool = False, warmup_steps: int = 0,
                     progress: Callable[[int, int], None] | bool | None = None) -> dict:
  """Trains `model` in place with AdamW and a cosine learning-rate schedule on softmax cross-entropy.

  Args:
    model: an nnx classifier (`model(images, train=True) -> logits`).
    x_train: (N, ...) uint8 images. y_train: (N,) int class ids.
    epochs: passes over the data (fractional allowed); `max_steps` caps the number of steps.
    batch_size, learning_rate, weight_decay: optimizer settings (the last batch of an epoch is dropped so
      every step has a static shape).
    seed: shuffling / augmentation seed (dropout uses the model's own rngs).
    augment_flips: random horizontal/vertical flips.
    augment_rot90: random rotations by 0/90/180/270 degrees (square images; with `augment_flips`, all 8
      symmetries of the square).
    warmup_steps: linear learning-rate warm-up before the cosine decay (0 = none).
    progress: optional `progress(step, steps)` called after every step (e.g. a progress bar's update);
      a bool is accepted and ignored (the library draws no progress bars).

  Returns:
    {"steps", "final_loss" (mean of the last 50 steps), "train_s"}.
  """
  batch_size = checks.int_in_range("batch_size", batch_size)
  n = len(y_train)
  if n < batch_size:
    raise ValueError(f"batch_size {batch_size} exceeds the {n} training images")
  per_epoch = n // batch_size
  steps = max(1, int(round(epochs * per_epoch)))
  if max_steps is not None:
    steps = min(steps, int(max_steps))
  if warmup_steps:
    schedule = optax.warmup_cosine_decay_schedule(0.0, learning_rate, min(int(warmup_steps), steps - 1), steps)
  else:
    schedule = optax.cosine_decay_schedule(learning_rate, steps)
  optimizer = nnx.Optimizer(model, optax.adamw(schedule, weight_decay=weight_decay), wrt=nnx.Param)
  rng = np.random.default_rng(seed)
  losses, perm, t0 = [], None, time.perf_counter()
  for step in range(steps):
    if step % per_epoch == 0:
      perm = rng.permutation(n)
    idx = perm[(step % per_epoch) * batch_size:(step % per_epoch + 1) * batch_size]
    xb = x_train[idx]
    if augment_rot90:
      xb = _dihedral_augment(rng, xb) if augment_flips else _rot90_augment(rng, xb)
    elif augment_flips:
      xb = _flip_augment(rng, xb)
    losses.append(_train_step(model, optimizer, jnp.asarray(xb), jnp.asarray(y_train[idx], jnp.int32)))
    if callable(progress):
      progress(step + 1, steps)
  final = float(np.mean([float(v) for v in losses[-50:]]))
  return {"steps": steps, "final_loss": final, "train_s": time.perf_counter() - t0}


def predict(model: nnx.Module, images: np.ndarray, batch_size: int = 500) -> np.ndarray:
  """(N,) int predicted classes (argmax of the exact logits)."""
  out = [np.asarray(_logits(model, jnp.asarray(images[i:i + batch_size]))).argmax(1)
         for i in range(0, len(images), batch_size)]
  return np.concatenate(out)


def accuracy(model: nnx.Module, images: np.ndarray, labels: np.ndarray, batch_size: int = 500) -> float:
  """Top-1 accuracy on (images, labels)."""
  batch_size = checks.int_in_range("batch_size", batch_size)
  return float((predict(model, images, batch_size) == np.asarray(labels)).mean())


def extract_features(model: nnx.Module, images: np.ndarray, batch_size: int = 250) -> np.ndarray:
  """(N, d) float32 penultimate activations `model.features(images)` (the AdaptiveSoftmax queries x)."""
  batch_size = checks.int_in_range("batch_size", batch_size)
  return np.concatenate([np.asarray(_features(model, checks.as_array(images[i:i + batch_size])), np.float32)
                         for i in range(0, len(images), batch_size)])


# What a weights file holds: the trainable parameters and BatchNorm running statistics (models without
# BatchNorm store exactly their nnx.Param leaves, so files written before BatchStat was added still load).
_SAVED = (nnx.Param, nnx.BatchStat)


def _named_params(model: nnx.Module) -> dict[str, jax.Array]:
  state = nnx.state(model, nnx.Any(*_SAVED))
  return {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_leaves_with_path(state)}


def save_params(model: nnx.Module, path: str, metadata: dict | None = None) -> None:
  """Writes the model's nnx.Param and nnx.BatchStat leaves to a safetensors file (atomically); `metadata` is stored as json."""
  from safetensors.numpy import save_file

  checks.string("path", path)
  tensors = {k: np.ascontiguousarray(np.asarray(v)) for k, v in _named_params(model).items()}
  with results.atomic_path(path) as tmp:
    save_file(tensors, tmp, metadata={"info": json.dumps(metadata or {}), "sha256": _tensors_sha256(tensors)})


def _tensors_sha256(tensors: dict[str, np.ndarray]) -> str:
  """sha256 over the names, shapes, dtypes and bytes of the tensors (stored with the weights, verified on load)."""
  h = hashlib.sha256()
  for k in sorted(tensors):
    a = np.ascontiguousarray(tensors[k])
    h.update(f"{k}|{a.shape}|{a.dtype}|".encode())
    h.update(a.tobytes())
  return h.hexdigest()


def load_params(model: nnx.Module, path: str) -> dict:
  """Loads a `save_params` file into `model` in place; returns the stored metadata.

  Raises:
    ValueError: naming `path`: the file cannot be read (truncated), has no checksum or fails it (flipped bytes),
      or its tensor names or shapes do not match the model (e.g. a different architecture).
  """
  from safetensors import safe_open
  from safetensors.numpy import load_file

  try:
    tensors = load_file(path)
    with safe_open(path, "np") as f:
      header = f.metadata() or {}
    meta = json.loads(header.get("info", "{}"))
  except Exception as e:  # pylint: disable=broad-except -- SafetensorError, json errors, OSError, ...
    raise ValueError(f"path: weights file {path} is unreadable ({type(e).__name__}: {e})") from e
  if header.get("sha256") != _tensors_sha256(tensors):
    raise ValueError(f"path: weights file {path} has no checksum or fails it (corrupted or written by old code)")
  state = nnx.state(model, nnx.Any(*_SAVED))
  expected = _named_params(model)
  if set(tensors) != set(expected) or any(tensors[k].shape != expected[k].shape for k in expected):
    raise ValueError(f"path: {path} does not match the model's parameters "
                     f"({sorted((k, v.shape) for k, v in tensors.items())[:4]}...)")
  new = jax.tree_util.tree_map_with_path(lambda p, v: checks.as_array(tensors[jax.tree_util.keystr(p)]), state)
  nnx.update(model, new)
  return meta


def train_or_load(model: nnx.Module, path: str, train_fn, *, retrain: bool = False) -> tuple[dict, bool]:
  """Loads cached weights from `path` unless `retrain` or absent; otherwise calls `train_fn()` (which trains
  `model` in place and returns a json-able dict) and caches the weights with that dict as metadata.

  Returns:
    (metadata, loaded_from_cache).
  """
  retrain = checks.boolean("retrain", retrain)
  if not callable(train_fn):
    raise ValueError(f"train_fn must be callable () -> dict, got {train_fn!r}")
  if not retrain and os.path.exists(path):
    try:
      return load_params(model, path), True
    except ValueError as e:  # corrupted, truncated, or another architecture: say which file, retrain, overwrite
      warnings.warn(f"{e}; retraining and overwriting {path}")
  meta = train_fn()
  save_params(model, path, meta)
  return meta, False
