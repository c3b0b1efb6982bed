"""A small class-conditional pixel-space diffusion model of the 8x8 handwritten digits, in two
shipped networks trained here: a residual MLP (:mod:`.mlp`) and a Stable-Diffusion-style UNet
(:mod:`.unet`), with the held-out data and the classifier they share (:mod:`.common`).

Data: the 1,797 8x8 grey-level digits (UCI "Optical Recognition of Handwritten Digits", as shipped
by scikit-learn), scaled from [0, 16] to [-1, 1], one channel: samples are ``[B, 1, 8, 8]``.
A fixed, seeded 80/20 split; the held-out 20% ships with the package (``digits_heldout.npz``)
and training never sees it.

Model: epsilon prediction on diffusers' default schedule (linear betas 1e-4..0.02, 1000 steps).
Label 10 is the unconditional ("null") label; training drops labels to it with probability 0.15,
so classifier-free guidance works (Ho & Salimans 2022, arXiv:2207.12598).

A logistic-regression digit classifier trained on the same training split ships with it, to
score guided samples (``classify``).

    from dpmjax.models import digits
    model = digits.load()                      # or digits.load("unet")
    images, labels = digits.heldout()
    python -m dpmjax.models.digits.train       # retrain (needs scikit-learn: pip install ".[train]")
"""

from .common import (EMBED, HELDOUT, HERE, MODELS, NULL_LABEL, SHAPE, WEIGHTS, classify, heldout, timestep_embedding,
                     weights_path)
from .mlp import BLOCKS, WIDTH, DigitsDenoiser, init_params
from .shipped import Digits, load, unguided_model
from .unet import DigitsUNet

__all__ = ["Digits", "DigitsDenoiser", "DigitsUNet", "load", "unguided_model", "heldout", "classify", "init_params",
           "weights_path", "timestep_embedding", "NULL_LABEL", "SHAPE", "MODELS", "HERE", "WEIGHTS", "HELDOUT", "WIDTH",
           "BLOCKS", "EMBED"]
