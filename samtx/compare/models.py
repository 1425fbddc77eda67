"""The models of ``samtx compare`` (Flax NNX) and their functional form.

- :class:`MLP`: ReLU MLP on flattened inputs (He initialisation).
- :class:`CNN`: two convolutions with BatchNorm and ReLU, pooling, dropout and
  a linear head; 2D on digits (8x8), 1D on MNIST-1D (length 40).
- :class:`Transformer`: a decoder-only, pre-LayerNorm transformer with causal
  self-attention and learned positions, for next-character prediction.

The trainer vmaps many runs and scans over steps, so it works on pure pytrees:
:func:`build` splits a model into ``(graphdef, params, stats)`` and
:class:`Functional` applies it as ``apply(params, stats, x, train, key) ->
(logits, new_stats)``. ``stats`` holds the BatchNorm statistics (empty for
models without BatchNorm); ``key`` is the dropout key, so the perturbed pass
of a two-pass optimizer can reuse the clean pass's key, and the caller decides
which pass's statistics to keep (DESIGN.md "Flax").
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional, Sequence

import jax
from flax import nnx

__all__ = ["MLP", "CNN", "Transformer", "Functional", "build", "MODELS"]

MODELS = ("mlp", "cnn", "transformer")


class MLP(nnx.Module):
  """ReLU MLP with He-initialised weights.

  Args:
    sizes: layer widths, input first, classes last.
    rngs: initialisation RNGs.
  """

  def __init__(self, sizes: Sequence[int], *, rngs: nnx.Rngs):
    init = nnx.initializers.he_normal()
    self.layers = nnx.List([nnx.Linear(m, n, kernel_init=init, rngs=rngs)
                            for m, n in zip(sizes[:-1], sizes[1:])])

  def __call__(self, x, *, train: bool = False, dropout_key=None):
    del train, dropout_key  # no BatchNorm, no dropout
    x = x.reshape(x.shape[0], -1)
    for layer in self.layers[:-1]:
      x = jax.nn.relu(layer(x))
    return self.layers[-1](x)


class CNN(nnx.Module):
  """Conv-BN-ReLU, 2x max-pool, Conv-BN-ReLU, dropout, linear head.

  The head reads the flattened feature map (the inputs are tiny: 4x4 or 20
  positions after the pool). Works in 1D or 2D: the number of spatial
  dimensions is ``len(input_shape)``; odd sizes are floored by the pool.

  Args:
    input_shape: spatial shape of one example (single channel).
    num_classes: output classes.
    channels: channels of the two convolutions.
    kernel: kernel size along each spatial axis.
    dropout: dropout rate before the head.
    rngs: initialisation RNGs.
  """

  def __init__(self, input_shape: Sequence[int], num_classes: int, *,
               channels: Sequence[int] = (16, 32), kernel: int = 3,
               dropout: float = 0.1, rngs: nnx.Rngs):
    self.input_shape = tuple(input_shape)
    dims = len(self.input_shape)
    size = (kernel,) * dims
    self.conv1 = nnx.Conv(1, channels[0], size, rngs=rngs)
    self.bn1 = nnx.BatchNorm(channels[0], momentum=0.9, rngs=rngs)
    self.conv2 = nnx.Conv(channels[0], channels[1], size, rngs=rngs)
    self.bn2 = nnx.BatchNorm(channels[1], momentum=0.9, rngs=rngs)
    self.dropout = nnx.Dropout(dropout)
    pooled = math.prod(n // 2 for n in self.input_shape)
    self.head = nnx.Linear(pooled * channels[1], num_classes, rngs=rngs)

  def __call__(self, x, *, train: bool = False, dropout_key=None):
    dims = len(self.input_shape)
    x = x.reshape((x.shape[0],) + self.input_shape + (1,))
    x = jax.nn.relu(self.bn1(self.conv1(x), use_running_average=not train))
    window = (2,) * dims
    x = nnx.max_pool(x, window, strides=window)
    x = jax.nn.relu(self.bn2(self.conv2(x), use_running_average=not train))
    x = x.reshape(x.shape[0], -1)
    x = self.dropout(x, deterministic=not train, rngs=dropout_key)
    return self.head(x)


class Block(nnx.Module):
  """Pre-LayerNorm transformer block: causal self-attention, then a GELU MLP."""

  def __init__(self, width: int, heads: int, *, rngs: nnx.Rngs):
    self.ln1 = nnx.LayerNorm(width, rngs=rngs)
    self.attention = nnx.MultiHeadAttention(
        heads, width, decode=False, keep_rngs=False, rngs=rngs)
    self.ln2 = nnx.LayerNorm(width, rngs=rngs)
    self.up = nnx.Linear(width, 4 * width, rngs=rngs)
    self.down = nnx.Linear(4 * width, width, rngs=rngs)

  def __call__(self, x, mask):
    x = x + self.attention(self.ln1(x), mask=mask)
    return x + self.down(jax.nn.gelu(self.up(self.ln2(x))))


class Transformer(nnx.Module):
  """Decoder-only transformer language model (next-token logits).

  Args:
    vocab: vocabulary size.
    context: the longest sequence it reads (learned positions).
    width: model width d.
    depth: number of blocks.
    heads: attention heads.
    rngs: initialisation RNGs.
  """

  def __init__(self, vocab: int, context: int, *, width: int = 64,
               depth: int = 2, heads: int = 4, rngs: nnx.Rngs):
    self.embed = nnx.Embed(vocab, width, rngs=rngs)
    self.positions = nnx.Param(
        0.02 * jax.random.normal(rngs.params(), (context, width)))
    self.blocks = nnx.List([Block(width, heads, rngs=rngs)
                            for _ in range(depth)])
    self.ln = nnx.LayerNorm(width, rngs=rngs)
    self.head = nnx.Linear(width, vocab, rngs=rngs)

  def __call__(self, tokens, *, train: bool = False, dropout_key=None):
    del train, dropout_key  # no dropout, no BatchNorm
    length = tokens.shape[-1]
    x = self.embed(tokens) + self.positions[...][:length]
    mask = nnx.make_causal_mask(tokens)
    for block in self.blocks:
      x = block(x, mask)
    return self.head(self.ln(x))


def _create(name: str, data, options: dict, key) -> nnx.Module:
  rngs = nnx.Rngs(params=key)
  if name == "mlp":
    width = math.prod(data.input_shape)
    return MLP((width,) + tuple(options["hidden"]) + (data.num_classes,),
               rngs=rngs)
  if name == "cnn":
    return CNN(data.input_shape, data.num_classes, rngs=rngs, **options)
  if name == "transformer":
    return Transformer(data.num_classes, data.input_shape[0], rngs=rngs,
                       **options)
  raise ValueError(f"unknown model {name!r}; choose from {MODELS}.")


@dataclasses.dataclass(frozen=True)
class Functional:
  """A model as pure functions of ``(params, stats)`` pytrees.

  Attributes:
    graphdef: the model's static structure.
    create: ``key -> nnx.Module``, a freshly initialised model.
  """
  graphdef: Any
  create: Any

  def init(self, key):
    """``(params, stats)`` of a freshly initialised model (vmappable)."""
    _, params, stats = nnx.split(self.create(key), nnx.Param, ...)
    return nnx.as_pure(params), nnx.as_pure(stats)

  def apply(self, params, stats, x, *, train: bool, key=None):
    """Logits and the BatchNorm statistics after this forward pass.

    Args:
      params: parameter pytree (pure ``nnx.State``).
      stats: statistics pytree (pure ``nnx.State``, empty without BatchNorm).
      x: a batch of inputs.
      train: training mode (batch statistics, dropout) or evaluation mode.
      key: dropout key (ignored by models without dropout and when not
        ``train``).

    Returns:
      ``(logits, new_stats)``; ``new_stats`` equals ``stats`` unless
      ``train`` and the model has BatchNorm.
    """
    # merge builds fresh Variables from pure arrays: the caller's trees are
    # never mutated, whichever pass this is.
    model = nnx.merge(self.graphdef, params, stats)
    logits = model(x, train=train, dropout_key=key if train else None)
    return logits, nnx.as_pure(nnx.split(model, nnx.Param, ...)[2])


def build(name: str, data, options: Optional[dict] = None) -> Functional:
  """The functional form of model ``name`` sized for ``data``.

  Args:
    name: ``"mlp"``, ``"cnn"`` or ``"transformer"``.
    data: a :class:`samtx.compare.data.Dataset` (its ``input_shape`` and
      ``num_classes``).
    options: keyword arguments of the model class (``{"hidden": (...)}`` for
      the MLP).

  Returns:
    A :class:`Functional`.

  Example:
    >>> from samtx.compare import data as data_lib
    >>> digits = data_lib.load("digits")
    >>> model = build("cnn", digits, {"channels": (4, 8)})
    >>> params, stats = model.init(jax.random.key(0))
    >>> logits, new_stats = model.apply(params, stats, digits.x_train[:5],
    ...                                 train=True, key=jax.random.key(1))
    >>> logits.shape
    (5, 10)
  """
  options = dict(options or {})
  create = lambda key: _create(name, data, options, key)
  graphdef = nnx.split(nnx.eval_shape(lambda: create(jax.random.key(0))))[0]
  return Functional(graphdef, create)
