"""The residual MLP of the digits: the first shipped model.

Epsilon prediction on diffusers' default schedule (linear betas 1e-4..0.02, 1000 steps). A
residual MLP over the 64 pixels (width 256, 4 blocks, LayerNorm, SiLU), conditioned by adding a
sinusoidal timestep embedding and a learned label embedding to every block. Training drops labels
to the null label with probability 0.15, so classifier-free guidance works (Ho & Salimans 2022,
arXiv:2207.12598).
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from .common import NULL_LABEL, SHAPE, timestep_embedding

WIDTH, BLOCKS = 256, 4


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


def init_params(key) -> dict:
    """Freshly initialised :class:`DigitsDenoiser` parameters.

    Args:
        key: A ``jax.random`` key.

    Returns:
        The Flax parameter dict (``{"params": ...}``).
    """
    return DigitsDenoiser().init(key, jnp.zeros((1,) + SHAPE), jnp.zeros(()), jnp.zeros((1,), jnp.int32))
