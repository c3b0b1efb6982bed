"""The shipped digits models, loaded from their weights: :class:`Digits` (a denoiser, its
parameters and the classifier), :func:`load` and :func:`unguided_model`.

    python -m dpmjax.models.digits.train       # retrain (needs scikit-learn: pip install ".[train]")
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

from . import common, mlp, unet
from .common import MODELS, NULL_LABEL
from .mlp import DigitsDenoiser


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


@functools.lru_cache(maxsize=2)
def load(model: str = "mlp") -> Digits:
    """A shipped model from its weights (flax msgpack): ``"mlp"``, the residual MLP of
    :mod:`dpmjax.models.digits.mlp`, or
    ``"unet"``, the Stable-Diffusion-style UNet of :mod:`dpmjax.models.digits.unet`. Both score
    samples with the same classifier (stored with the MLP).

    The result is cached (one load per model).

    Args:
        model: ``"mlp"`` (default) or ``"unet"``.

    Returns:
        The :class:`Digits` model.

    Raises:
        ValueError: ``model`` is neither ``"mlp"`` nor ``"unet"``.
        FileNotFoundError: The weights file is missing (retrain with
            ``python -m dpmjax.models.digits.train --model MODEL``).
    """
    if model not in MODELS:
        raise ValueError(f"model must be one of {MODELS}, got {model!r}.")
    path = common.weights_path(model)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} is missing: run python -m dpmjax.models.digits.train --model {model}")
    template = {"params": mlp.init_params(jax.random.PRNGKey(0)), "classifier": (np.zeros((64, 10), np.float32), np.zeros(10, np.float32))}
    with open(common.WEIGHTS, "rb") as f:
        restored = flax.serialization.from_bytes(template, f.read())
    classifier = tuple(jnp.asarray(a) for a in restored["classifier"])
    if model == "mlp":
        return Digits(restored["params"], classifier)
    with open(path, "rb") as f:
        params = flax.serialization.from_bytes(unet.init_params(jax.random.PRNGKey(0)), f.read())
    return Digits(params, classifier, unet.DigitsUNet())


@functools.lru_cache(maxsize=1)
def unguided_model():
    """``model_fn(x, t)``: the shipped model with the null label (no guidance); the batch
    inversion job's built-in default (``dpmjax invert-batch --model dpmjax.models.digits:unguided_model``).

    Returns:
        ``model_fn(x, t) -> eps`` of the shipped MLP for ``x: [B, 1, 8, 8]`` (cached).
    """
    model = load()
    return lambda x, t: model.conditional(x, t, jnp.full((x.shape[0],), NULL_LABEL, jnp.int32))
