"""A small ResNet for EuroSAT whose penultimate layer is a wide ReLU layer (the AdaptiveSoftmax query x).

The paper (Baharav et al., NeurIPS 2024, Table 1) takes x from ImageNet VGG-19's fc7 (4096 ReLU units, sparse and
non-negative) and A from a linear layer trained on top. Offline we train from scratch instead; to keep x VGG-like
the network ends in global average pooling -> Linear(width) -> ReLU (= x) -> dropout -> Linear(n_classes, no
bias) = A. Designed for CPUs: a space-to-depth stem (64 x 64 x 3 -> 32 x 32 x 12, no information lost) and one
or two pre-activation-free basic blocks per stage with BatchNorm.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from asoftmax.models.cnn import prepare_images


def space_to_depth(x: jax.Array, block: int) -> jax.Array:
  """(N, H, W, C) -> (N, H / block, W / block, C * block**2): every block x block patch becomes one pixel."""
  n, h, w, c = x.shape
  if h % block or w % block:
    raise ValueError(f"images: height and width {h} x {w} must be multiples of the stem block {block}")
  x = x.reshape(n, h // block, block, w // block, block, c)
  return x.transpose(0, 1, 3, 2, 4, 5).reshape(n, h // block, w // block, c * block * block)


class _Block(nnx.Module):
  """conv3x3(stride) -> BN -> ReLU -> conv3x3 -> BN, plus a (1x1 conv + BN when the shape changes) shortcut."""

  def __init__(self, c_in: int, c_out: int, stride: int, *, rngs: nnx.Rngs):
    self.conv1 = nnx.Conv(c_in, c_out, (3, 3), strides=stride, padding="SAME", use_bias=False, rngs=rngs)
    self.bn1 = nnx.BatchNorm(c_out, momentum=0.9, rngs=rngs)
    self.conv2 = nnx.Conv(c_out, c_out, (3, 3), padding="SAME", use_bias=False, rngs=rngs)
    self.bn2 = nnx.BatchNorm(c_out, momentum=0.9, scale_init=nnx.initializers.zeros, rngs=rngs)
    self.has_proj = stride != 1 or c_in != c_out
    if self.has_proj:
      self.proj = nnx.Conv(c_in, c_out, (1, 1), strides=stride, use_bias=False, rngs=rngs)
      self.bn_proj = nnx.BatchNorm(c_out, momentum=0.9, rngs=rngs)

  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    ura = not train
    y = jax.nn.relu(self.bn1(self.conv1(x), use_running_average=ura))
    y = self.bn2(self.conv2(y), use_running_average=ura)
    s = x if not self.has_proj else self.bn_proj(self.proj(x), use_running_average=ura)
    return jax.nn.relu(y + s)


class EuroSATResNet(nnx.Module):
  """space-to-depth(2) -> conv3x3(c0) -> BN -> ReLU -> stages of basic blocks (stride 2 between stages)
  -> global average pool -> Linear(width) -> ReLU (= x) -> dropout (training only) -> Linear(n_classes, no bias).

  Input (N, 64, 64, 3) uint8 (scaled to [0, 1]) or float. `features` returns the (N, width) ReLU activations,
  `head_matrix()` the (n_classes, width) matrix A, and `model(images) == features(images) @ A.T` in eval mode.

  Example:
    >>> import numpy as np
    >>> from flax import nnx
    >>> m = EuroSATResNet(channels=(4, 8), blocks=(1, 1), width=32, rngs=nnx.Rngs(0))
    >>> x = m.features(np.zeros((2, 64, 64, 3), np.uint8))
    >>> x.shape, m.head_matrix().shape
    ((2, 32), (10, 32))
  """

  def __init__(self, *, channels: tuple[int, ...] = (32, 64, 128, 256), blocks: tuple[int, ...] | None = None,
               width: int = 2048, n_classes: int = 10, stem_block: int = 2, dropout: float = 0.0,
               rngs: nnx.Rngs):
    channels = tuple(int(c) for c in channels)
    blocks = tuple(int(b) for b in (blocks or (1,) * len(channels)))
    if len(blocks) != len(channels) or not channels or min(blocks) < 1:
      raise ValueError(f"blocks {blocks} must give one count >= 1 per stage of channels {channels}")
    self.stem_block = int(stem_block)
    self.stem = nnx.Conv(3 * self.stem_block ** 2, channels[0], (3, 3), padding="SAME", use_bias=False, rngs=rngs)
    self.stem_bn = nnx.BatchNorm(channels[0], momentum=0.9, rngs=rngs)
    layers, c_in = [], channels[0]
    for si, (c, b) in enumerate(zip(channels, blocks)):
      for bi in range(b):
        layers.append(_Block(c_in, c, 2 if (si > 0 and bi == 0) else 1, rngs=rngs))
        c_in = c
    self.blocks = nnx.List(layers)
    self.fc = nnx.Linear(c_in, width, rngs=rngs)
    self.dropout = nnx.Dropout(dropout, rngs=rngs)
    self.head = nnx.Linear(width, n_classes, use_bias=False, rngs=rngs)
    self.dim = int(width)

  def _trunk(self, images: jax.Array, train: bool) -> jax.Array:
    x = prepare_images(images, 3)
    x = (x - 0.5) / 0.25
    if self.stem_block > 1:
      x = space_to_depth(x, self.stem_block)
    x = jax.nn.relu(self.stem_bn(self.stem(x), use_running_average=not train))
    for block in self.blocks:
      x = block(x, train)
    return jax.nn.relu(self.fc(x.mean(axis=(1, 2))))

  def features(self, images: jax.Array) -> jax.Array:
    """(N, width) float32 non-negative penultimate activations (eval mode: BatchNorm running statistics)."""
    return self._trunk(images, False)

  def head_matrix(self) -> jax.Array:
    """A: (n_classes, d) float32, so that logits = features @ A.T."""
    return self.head.kernel[...].T

  def __call__(self, images: jax.Array, *, train: bool = False) -> jax.Array:
    return self.head(self.dropout(self._trunk(images, train), deterministic=not train))
