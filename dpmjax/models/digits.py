"""A small class-conditional pixel-space diffusion model of the 8x8 handwritten digits.

Data: the 1,797 8x8 grey-level digits (UCI "Optical Recognition of Handwritten Digits", as shipped
by scikit-learn), scaled from [0, 16] to [-1, 1], one channel: samples are ``[B, 1, 8, 8]``.
A fixed, seeded 80/20 split; the held-out 20% ships with the package (``digits_heldout.npz``)
and training never sees it.

Model: epsilon prediction on diffusers' default schedule (linear betas 1e-4..0.02, 1000 steps).
A residual MLP over the 64 pixels (width 256, 4 blocks, LayerNorm, SiLU), conditioned by adding a
sinusoidal timestep embedding and a learned label embedding to every block. Label 10 is the
unconditional ("null") label; training drops labels to it with probability 0.15, so
classifier-free guidance works (Ho & Salimans 2022, arXiv:2207.12598).

A logistic-regression digit classifier trained on the same training split ships with it, to
score guided samples (``classify``).

    python -m dpmjax.models.train_digits       # retrain (needs scikit-learn: pip install ".[train]")
"""

from __future__ import annotations

import functools
import os
from typing import NamedTuple

import flax.linen as nn
import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
WEIGHTS = os.path.join(HERE, "digits_weights.msgpack")
HELDOUT = os.path.join(HERE, "digits_heldout.npz")
NULL_LABEL = 10
SHAPE = (1, 8, 8)
WIDTH, BLOCKS, EMBED = 256, 4, 128


def timestep_embedding(t: jax.Array, dim: int = EMBED) -> jax.Array:
    """Sinusoidal embedding of the training timestep (Vaswani et al. 2017), ``[B, dim]``.

    Args:
        t: The timestep: a scalar or ``[B]``.
        dim: The embedding width (default 128): ``dim // 2`` sines, then as many cosines.

    Returns:
        ``[B, dim]`` float32 (``[1, dim]`` for a scalar ``t``).
    """
    half = dim // 2
    freqs = jnp.exp(-np.log(10000.0) * jnp.arange(half) / half)
    angles = jnp.asarray(t, jnp.float32).reshape(-1, 1) * freqs[None]
    return jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=-1)


class DigitsDenoiser(nn.Module):
    """``eps(x, t, label)`` for ``x: [B, 1, 8, 8]``, ``t``: scalar or ``[B]``, ``label: [B]`` int (10 = null)
    or, as floats ``[B, width]``, a label *embedding* (what null-text inversion optimises).

    A residual MLP over the 64 pixels (LayerNorm, SiLU), conditioned by adding a sinusoidal
    timestep embedding and the label embedding to every block. Its output has ``x``'s shape and
    dtype.

    Attributes:
        width: The hidden width and the label-embedding width (default 256).
        blocks: The number of residual blocks (default 4).
    """

    width: int = WIDTH
    blocks: int = BLOCKS

    @nn.compact
    def __call__(self, x, t, label):
        batch = x.shape[0]
        t = jnp.broadcast_to(jnp.asarray(t, jnp.float32), (batch,))
        emb = nn.Dense(self.width)(nn.silu(nn.Dense(self.width)(timestep_embedding(t))))
        table = nn.Embed(NULL_LABEL + 1, self.width, name="Embed_0")
        label = jnp.asarray(label)
        emb = emb + (label.astype(jnp.float32) if jnp.issubdtype(label.dtype, jnp.floating) else table(label))
        h = nn.Dense(self.width)(x.reshape(batch, -1).astype(jnp.float32))
        for _ in range(self.blocks):
            r = nn.silu(nn.LayerNorm()(h) + emb)
            r = nn.Dense(self.width)(r)
            r = nn.Dense(self.width)(nn.silu(nn.LayerNorm()(r)))
            h = h + r
        out = nn.Dense(int(np.prod(SHAPE)), kernel_init=nn.initializers.zeros)(nn.silu(nn.LayerNorm()(h)))
        return out.reshape(x.shape).astype(x.dtype)


class Digits(NamedTuple):
    """A shipped model: the denoiser ``net`` (a Flax module) with its ``params``, and the
    classifier's ``(weights, bias)``.

    Attributes:
        params: The denoiser's Flax parameters.
        classifier: The digit classifier's ``(weights [64, 10], bias [10])`` (see
            :func:`classify`).
        net: The denoiser module (default :class:`DigitsDenoiser`).
    """

    params: dict
    classifier: tuple
    net: nn.Module = DigitsDenoiser()

    def model_fn(self, label):
        """``model_fn(x, t)`` for a fixed label batch ``[B]`` (use :func:`dpmjax.classifier_free_guidance`
        with :meth:`conditional` for guidance).

        Args:
            label: ``[B]`` int labels (``NULL_LABEL`` = 10 for the unconditional model), or a
                ``[B, width]`` float embedding.

        Returns:
            ``model_fn(x, t) -> eps`` for ``x: [B, 1, 8, 8]``.
        """
        return lambda x, t: self.net.apply(self.params, x, t, label)

    def conditional(self, x, t, label):
        """``model(x, t, label)``: the form :func:`dpmjax.classifier_free_guidance` takes. ``label`` is
        ``[B]`` int or a ``[B, width]`` float embedding (see :meth:`embed`).

        Args:
            x: ``[B, 1, 8, 8]``, the noisy images.
            t: The training timestep, a scalar or ``[B]``.
            label: ``[B]`` int labels (10 = null) or ``[B, width]`` float embeddings.

        Returns:
            The noise prediction ``eps``, with ``x``'s shape and dtype.
        """
        return self.net.apply(self.params, x, t, label)

    def embed(self, labels) -> jax.Array:
        """The learned label embeddings ``[B, width]`` of ``labels`` (``NULL_LABEL`` gives the null one).

        Args:
            labels: Int labels in ``[0, 10]``, e.g. ``[B]``.

        Returns:
            The embeddings, ``labels``' shape plus ``[width]``.
        """
        return self.params["params"]["Embed_0"]["embedding"][jnp.asarray(labels)]


def classify(classifier, images: jax.Array) -> jax.Array:
    """Predicted digit for images ``[B, 1, 8, 8]`` in [-1, 1].

    Args:
        classifier: The logistic-regression classifier's ``(weights [64, 10], bias [10])``, e.g.
            :attr:`Digits.classifier`.
        images: ``[B, 1, 8, 8]`` images in [-1, 1].

    Returns:
        ``[B]`` int, the predicted digit of each image.
    """
    w, b = classifier
    return jnp.argmax(images.reshape(images.shape[0], -1) @ w + b, axis=-1)


def init_params(key) -> dict:
    """Freshly initialised :class:`DigitsDenoiser` parameters.

    Args:
        key: A ``jax.random`` key.

    Returns:
        The Flax parameter dict (``{"params": ...}``).
    """
    return DigitsDenoiser().init(key, jnp.zeros((1,) + SHAPE), jnp.zeros(()), jnp.zeros((1,), jnp.int32))


MODELS = ("mlp", "unet")


def weights_path(model: str) -> str:
    """The shipped weights file of ``model`` (``"mlp"``, or else the UNet's).

    Args:
        model: ``"mlp"`` or ``"unet"``.

    Returns:
        The path of its flax msgpack file.
    """
    return WEIGHTS if model == "mlp" else os.path.join(HERE, "digits_unet_weights.msgpack")


@functools.lru_cache(maxsize=2)
def load(model: str = "mlp") -> Digits:
    """A shipped model from its weights (flax msgpack): ``"mlp"``, the residual MLP above, or
    ``"unet"``, the Stable-Diffusion-style UNet of :mod:`dpmjax.models.digits_unet`. Both score
    samples with the same classifier (stored with the MLP).

    The result is cached (one load per model).

    Args:
        model: ``"mlp"`` (default) or ``"unet"``.

    Returns:
        The :class:`Digits` model.

    Raises:
        ValueError: ``model`` is neither ``"mlp"`` nor ``"unet"``.
        FileNotFoundError: The weights file is missing (retrain with
            ``python -m dpmjax.models.train_digits --model MODEL``).
    """
    if model not in MODELS:
        raise ValueError(f"model must be one of {MODELS}, got {model!r}.")
    from . import digits_unet

    path = weights_path(model)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} is missing: run python -m dpmjax.models.train_digits --model {model}")
    template = {"params": init_params(jax.random.PRNGKey(0)), "classifier": (np.zeros((64, 10), np.float32), np.zeros(10, np.float32))}
    with open(WEIGHTS, "rb") as f:
        restored = flax.serialization.from_bytes(template, f.read())
    classifier = tuple(jnp.asarray(a) for a in restored["classifier"])
    if model == "mlp":
        return Digits(restored["params"], classifier)
    with open(path, "rb") as f:
        params = flax.serialization.from_bytes(digits_unet.init_params(jax.random.PRNGKey(0)), f.read())
    return Digits(params, classifier, digits_unet.DigitsUNet())


def heldout():
    """``(images [M, 1, 8, 8] in [-1, 1], labels [M])``: the test split, never seen in training.

    Returns:
        ``(images, labels)``: float32 ``[M, 1, 8, 8]`` images in [-1, 1] and their int32 labels
        ``[M]`` (NumPy arrays).
    """
    data = np.load(HELDOUT)
    return data["images"].astype(np.float32), data["labels"].astype(np.int32)


@functools.lru_cache(maxsize=1)
def unguided_model():
    """``model_fn(x, t)``: the shipped model with the null label (no guidance); the batch
    inversion job's built-in default (``dpmjax invert-batch --model dpmjax.models.digits:unguided_model``).

    Returns:
        ``model_fn(x, t) -> eps`` of the shipped MLP for ``x: [B, 1, 8, 8]`` (cached).
    """
    model = load()
    return lambda x, t: model.conditional(x, t, jnp.full((x.shape[0],), NULL_LABEL, jnp.int32))
