"""Small flax NNX image classifiers whose last layer is a bias-free linear map `logits = A x`.

For AdaptiveSoftmax (Baharav et al., NeurIPS 2024, Table 1) the classifier's final layer is the matrix
`A` (n_classes x d) and the penultimate activations of an image are the query `x` (d,). Both models expose
`features(images) -> x` and `head_matrix() -> A` so that `model(images) == features(images) @ A.T`.

- `MnistCNN`: the paper's MNIST setting, two 3x3 convolutions and a bias-free linear layer on the flattened
  14 x 14 x 128 feature map (d = 25,088, the paper's d).
- `EuroSATCNN`: a from-scratch stand-in for the paper's ImageNet VGG-19 features: three conv/pool blocks and a
  wide ReLU layer (d = `width`, 4096 by default like VGG's fc7), whose ReLU output is the sparse query x.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


def prepare_images(images: jax.Array, channels: int) -> jax.Array:
  """uint8 or float images (N, H, W[, C]) -> float32 (N, H, W, C); uint8 is scaled to [0, 1].

  Shared by the image models of this package (`cnn`, `resnet`); not re-exported (package-internal).

  >>> import numpy as np
  >>> prepare_images(np.full((2, 4, 4), 255, np.uint8), 1).shape
  (2, 4, 4, 1)
  """
  x = jnp.asarray(images)
  if x.ndim == 3:
    x = x[..., None]
  if x.ndim != 4 or x.shape[-1] != channels:
    raise ValueError(f"images must be (N, H, W) or (N, H, W, {channels}), got shape {tuple(x.shape)}")
  x = x.astype(jnp.float32)
  return x / 255.0 if jnp.issubdtype(jnp.asarray(images).dtype, jnp.integer) else x


def _pool(x: jax.Array) -> jax.Array:
  return nnx.max_pool(x, window_shape=(2, 2), strides=(2, 2))


class MnistCNN(nnx.Module):
  """conv3x3(32) -> ReLU -> maxpool2 -> conv3x3(128) -> ReLU -> flatten (14*14*128 = 25,088) -> Linear(10, no bias).

  Input (N, 28, 28) or (N, 28, 28, 1) uint8 (scaled to [0, 1]) or float. `features` returns (N, 25088) float32.
  """

  def __init__(self, *, channels: tuple[int, int] = (32, 128), n_classes: int = 10, rngs: nnx.Rngs):
    c1, c2 = channels
    self.conv1 = nnx.Conv(1, c1, kernel_size=(3, 3), padding="SAME", rngs=rngs)
    self.conv2 = nnx.Conv(c1, c2, kernel_size=(3, 3), padding="SAME", rngs=rngs)
    self.dim = 14 * 14 * c2
    self.head = nnx.Linear(self.dim, n_classes, use_bias=False, rngs=rngs)

  def features(self, images: jax.Array) -> jax.Array:
    x = prepare_images(images, 1)
    x = _pool(jax.nn.relu(self.conv1(x)))
    x = jax.nn.relu(self.conv2(x))
    return x.reshape(x.shape[0], -1)

  def head_matrix(self) -> jax.Array:
    """A: (n_classes, d) float32, so that logits = features @ A.T."""
    return self.head.kernel[...].T

  def __call__(self, images: jax.Array, *, train: bool = False) -> jax.Array:
    del train
    return self.head(self.features(images))


class EuroSATCNN(nnx.Module):
  """3 x [conv3x3 -> ReLU -> maxpool2] (64 -> 8 px) -> flatten -> Linear(width) -> ReLU (= x, sparse)
  -> dropout (training only) -> Linear(n_classes, no bias).

  Input (N, 64, 64, 3) uint8 or float. `features` returns the (N, width) ReLU activations.
  """

  def __init__(self, *, channels: tuple[int, int, int] = (16, 32, 64), width: int = 4096, n_classes: int = 10,
               image_size: int = 64, dropout: float = 0.5, rngs: nnx.Rngs):
    c = (3, *channels)
    self.convs = nnx.List([nnx.Conv(c[i], c[i + 1], kernel_size=(3, 3), padding="SAME", rngs=rngs)
                           for i in range(3)])
    side = image_size // 8
    self.fc = nnx.Linear(side * side * c[-1], width, rngs=rngs)
    self.dropout = nnx.Dropout(dropout, rngs=rngs)
    self.head = nnx.Linear(width, n_classes, use_bias=False, rngs=rngs)
    self.dim = width

  def features(self, images: jax.Array) -> jax.Array:
    x = prepare_images(images, 3)
    for conv in self.convs:
      x = _pool(jax.nn.relu(conv(x)))
    return jax.nn.relu(self.fc(x.reshape(x.shape[0], -1)))

  def head_matrix(self) -> jax.Array:
    """A: (n_classes, d) float32, so that logits = features @ A.T."""
    return self.head.kernel[...].T

  def __call__(self, images: jax.Array, *, train: bool = False) -> jax.Array:
    return self.head(self.dropout(self.features(images), deterministic=not train))
