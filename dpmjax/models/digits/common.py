"""What the two digits models share: the data (its shape, the labels, the held-out split), the
timestep embedding, the shipped files and the classifier that scores samples.

Data: the 1,797 8x8 grey-level digits (UCI "Optical Recognition of Handwritten Digits", as shipped
by scikit-learn), scaled from [0, 16] to [-1, 1], one channel: samples are ``[B, 1, 8, 8]``.
A fixed, seeded 80/20 split; the held-out 20% ships with the package (``digits_heldout.npz``)
and training never sees it. Label 10 is the unconditional ("null") label.

A logistic-regression digit classifier trained on the same training split ships with the MLP's
weights, to score guided samples of either model (:func:`classify`).
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
WEIGHTS = os.path.join(HERE, "digits_weights.msgpack")
HELDOUT = os.path.join(HERE, "digits_heldout.npz")
NULL_LABEL = 10
SHAPE = (1, 8, 8)
EMBED = 128
MODELS = ("mlp", "unet")


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


def weights_path(model: str) -> str:
    """The shipped weights file of ``model`` (``"mlp"``, or else the UNet's).

    Args:
        model: ``"mlp"`` or ``"unet"``.

    Returns:
        The path of its flax msgpack file.
    """
    return WEIGHTS if model == "mlp" else os.path.join(HERE, "digits_unet_weights.msgpack")


def heldout():
    """``(images [M, 1, 8, 8] in [-1, 1], labels [M])``: the test split, never seen in training.

    Returns:
        ``(images, labels)``: float32 ``[M, 1, 8, 8]`` images in [-1, 1] and their int32 labels
        ``[M]`` (NumPy arrays).
    """
    data = np.load(HELDOUT)
    return data["images"].astype(np.float32), data["labels"].astype(np.int32)
