"""Small models for the experiments: softmax regression, an MLP, a 3-layer conv net.

Every model is a pair ``init(key, in_shape, classes) -> params`` / ``apply(params, x) ->
logits`` over plain dicts and lists of arrays, so parameters are pytrees the bilevel
optimizers take as they are.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp

from gradhpo.core.types import PyTree


class Model(NamedTuple):
    """A model: ``init(key) -> params`` and ``apply(params, x) -> logits``."""

    name: str
    init: Callable[[jax.Array], PyTree]
    apply: Callable[[PyTree, jax.Array], jax.Array]


def _dense(key: jax.Array, n_in: int, n_out: int, scale: float) -> dict[str, jax.Array]:
    w = jax.random.normal(key, (n_in, n_out), jnp.float32) * jnp.sqrt(scale / n_in)
    return {"w": w, "b": jnp.zeros(n_out, jnp.float32)}


def mlp(sizes: Sequence[int]) -> Model:
    """A ReLU MLP with layer ``sizes`` (``[d, classes]`` is softmax regression).

    Args:
      sizes: input size, hidden sizes, output size.

    Returns:
      A :class:`Model` whose params are a list of ``{"w", "b"}`` dicts, one per layer.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from gradhpo_bench.models import mlp
      >>> model = mlp([4, 8, 3])
      >>> params = model.init(jax.random.PRNGKey(0))
      >>> model.apply(params, jnp.ones((5, 4))).shape
      (5, 3)
    """
    sizes = tuple(sizes)

    def init(key: jax.Array) -> list[dict[str, jax.Array]]:
        keys = jax.random.split(key, len(sizes) - 1)
        pairs = list(itertools.pairwise(sizes))
        # He initialisation for the ReLU layers; zeros for softmax regression (convex).
        if len(pairs) == 1:
            return [{"w": jnp.zeros(pairs[0], jnp.float32), "b": jnp.zeros(sizes[-1])}]
        return [_dense(k, a, b, 2.0) for k, (a, b) in zip(keys, pairs, strict=True)]

    def apply(params, x):
        for layer in params[:-1]:
            x = jax.nn.relu(x @ layer["w"] + layer["b"])
        return x @ params[-1]["w"] + params[-1]["b"]

    name = "softmax regression" if len(sizes) == 2 else "MLP " + "-".join(map(str, sizes))
    return Model(name, init, apply)


def convnet(image_size: int, classes: int, channels: int = 8) -> Model:
    """Three 3×3 stride-2 ReLU convolutions of ``channels`` channels, then a linear layer.

    The Greedy paper's hyper-cleaning model ("a 3-layer conv net with 8 channels").

    Args:
      image_size: height = width of the single-channel input images.
      classes: number of outputs.
      channels: channels of every convolution.

    Returns:
      A :class:`Model` taking images of shape ``(n, image_size, image_size)``.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from gradhpo_bench.models import convnet
      >>> model = convnet(8, 10)
      >>> model.apply(model.init(jax.random.PRNGKey(0)), jnp.ones((2, 8, 8))).shape
      (2, 10)
    """
    side = image_size
    for _ in range(3):
        side = (side + 1) // 2

    def init(key: jax.Array) -> dict[str, PyTree]:
        keys = jax.random.split(key, 4)
        convs = []
        for k, c_in in zip(keys[:3], (1, channels, channels), strict=True):
            w = jax.random.normal(k, (3, 3, c_in, channels), jnp.float32)
            convs.append({"w": w * jnp.sqrt(2.0 / (9 * c_in)), "b": jnp.zeros(channels)})
        return {"convs": convs, "head": _dense(keys[3], side * side * channels, classes, 1.0)}

    def apply(params, x):
        h = x[..., None]
        for layer in params["convs"]:
            w = jnp.transpose(layer["w"], (2, 0, 1, 3))  # patches order (c_in, kh, kw)
            h = jax.nn.relu(_patches(h) @ w.reshape(-1, w.shape[-1]) + layer["b"])
        h = h.reshape(h.shape[0], -1)
        return h @ params["head"]["w"] + params["head"]["b"]

    return Model(f"conv net 3×{channels} channels", init, apply)


def _patches(h: jax.Array) -> jax.Array:
    """The 3×3 stride-2 "SAME" patches of NHWC ``h``, features ordered (c_in, kh, kw).

    The convolution is written as these patches times a matrix (the same function), built
    from strided slices: XLA:CPU runs convolution gradients inside a loop (``lax.scan``)
    some 80 times slower than outside one, and ``lax.conv_general_dilated_patches`` is a
    convolution too; the slices' gradients are pads, which it runs fast.
    """
    n, height, width, c = h.shape
    out_h, out_w = (height + 1) // 2, (width + 1) // 2
    pad_h, pad_w = 2 * out_h + 1 - height, 2 * out_w + 1 - width  # SAME: low = total // 2
    h = jnp.pad(
        h, ((0, 0), (pad_h // 2, pad_h - pad_h // 2), (pad_w // 2, pad_w - pad_w // 2), (0, 0))
    )
    taps = [
        h[:, i : i + 2 * out_h - 1 : 2, j : j + 2 * out_w - 1 : 2, :]
        for i in range(3)
        for j in range(3)
    ]
    return jnp.stack(taps, axis=-1).reshape(n, out_h, out_w, c * 9)


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Per-example softmax cross-entropy of integer ``labels``.

    Example:
      >>> import jax.numpy as jnp
      >>> from gradhpo_bench.models import cross_entropy
      >>> cross_entropy(jnp.zeros((1, 4)), jnp.array([2]))
      Array([1.3862944], dtype=float32)
    """
    picked = jnp.take_along_axis(logits, labels[:, None], axis=-1)[:, 0]
    return jax.nn.logsumexp(logits, axis=-1) - picked


def accuracy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Fraction of rows whose arg-max equals the label.

    Example:
      >>> import jax.numpy as jnp
      >>> from gradhpo_bench.models import accuracy
      >>> float(accuracy(jnp.array([[0.0, 1.0], [2.0, 0.0]]), jnp.array([1, 1])))
      0.5
    """
    return jnp.mean(jnp.argmax(logits, axis=-1) == labels)
