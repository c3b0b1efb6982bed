"""A Stable-Diffusion-style UNet for the 8x8 digits: the second shipped model.

The same data, schedule and label dropout as the MLP (:mod:`dpmjax.models.digits.mlp`), with Stable
Diffusion's building blocks at toy size: ResNet blocks (GroupNorm, SiLU, 3x3 convolutions, the
timestep embedding added in between), transformer blocks with self-attention, cross-attention to
the conditioning tokens and a GEGLU feed-forward, a strided-convolution downsample and a
nearest-neighbour upsample with skip connections, 16/32 channels. The label is the "text": its
learned embedding is split into ``TOKENS`` tokens of ``TOKEN_DIM`` that every cross-attention
layer attends to, as SD's UNet attends to CLIP's token embeddings. Written in Flax here (no
diffusers import), so the job runs it without diffusers < 0.40.

A trained network with GroupNorm and attention is the case exact inversion must survive: the
mixture and the MLP are smooth; this is not.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from .common import NULL_LABEL, SHAPE, timestep_embedding

CHANNELS = (16, 32)
TOKENS, TOKEN_DIM = 4, 32
GROUPS = 4


class ResnetBlock(nn.Module):
    channels: int

    @nn.compact
    def __call__(self, x, emb):
        h = nn.Conv(self.channels, (3, 3))(nn.silu(nn.GroupNorm(GROUPS)(x)))
        h = h + nn.Dense(self.channels)(nn.silu(emb))[:, None, None, :]
        h = nn.Conv(self.channels, (3, 3))(nn.silu(nn.GroupNorm(GROUPS)(h)))
        skip = x if x.shape[-1] == self.channels else nn.Conv(self.channels, (1, 1))(x)
        return skip + h


class TransformerBlock(nn.Module):
    """SD's ``Transformer2DModel`` with one ``BasicTransformerBlock``: norm, self-attention,
    cross-attention to ``context``, GEGLU feed-forward, each residual; in and out 1x1 projections."""

    channels: int
    heads: int = 2

    @nn.compact
    def __call__(self, x, context):
        batch, height, width, channels = x.shape
        h = nn.Dense(channels)(nn.GroupNorm(GROUPS)(x).reshape(batch, height * width, channels))
        h = h + nn.MultiHeadDotProductAttention(self.heads, qkv_features=channels)(nn.LayerNorm()(h))
        h = h + nn.MultiHeadDotProductAttention(self.heads, qkv_features=channels)(nn.LayerNorm()(h), context)
        gate, value = jnp.split(nn.Dense(4 * channels)(nn.LayerNorm()(h)), 2, axis=-1)
        h = h + nn.Dense(channels)(value * nn.gelu(gate))
        return x + nn.Dense(channels)(h).reshape(batch, height, width, channels)


class DigitsUNet(nn.Module):
    """``eps(x, t, label)`` for ``x: [B, 1, 8, 8]`` (NCHW), ``t`` scalar or ``[B]``, ``label: [B]`` int
    (10 = null) or a float embedding ``[B, TOKENS * TOKEN_DIM]`` (what null-text inversion tunes)."""

    @nn.compact
    def __call__(self, x, t, label):
        batch = x.shape[0]
        t = jnp.broadcast_to(jnp.asarray(t, jnp.float32), (batch,))
        emb = nn.Dense(128)(nn.silu(nn.Dense(128)(timestep_embedding(t))))
        table = nn.Embed(NULL_LABEL + 1, TOKENS * TOKEN_DIM, name="Embed_0")
        label = jnp.asarray(label)
        tokens = label.astype(jnp.float32) if jnp.issubdtype(label.dtype, jnp.floating) else table(label)
        context = tokens.reshape(batch, TOKENS, TOKEN_DIM)

        h = nn.Conv(CHANNELS[0], (3, 3))(jnp.transpose(x.astype(jnp.float32), (0, 2, 3, 1)))
        h = TransformerBlock(CHANNELS[0])(ResnetBlock(CHANNELS[0])(h, emb), context)
        skip_8 = h
        h = nn.Conv(CHANNELS[0], (3, 3), strides=(2, 2))(h)                  # 8x8 -> 4x4
        h = ResnetBlock(CHANNELS[1])(h, emb)
        skip_4 = h
        h = ResnetBlock(CHANNELS[1])(TransformerBlock(CHANNELS[1])(ResnetBlock(CHANNELS[1])(h, emb), context), emb)
        h = ResnetBlock(CHANNELS[1])(jnp.concatenate([h, skip_4], axis=-1), emb)
        h = jnp.repeat(jnp.repeat(h, 2, axis=1), 2, axis=2)                   # 4x4 -> 8x8
        h = nn.Conv(CHANNELS[1], (3, 3))(h)
        h = ResnetBlock(CHANNELS[0])(jnp.concatenate([h, skip_8], axis=-1), emb)
        h = TransformerBlock(CHANNELS[0])(h, context)
        out = nn.Conv(SHAPE[0], (3, 3), kernel_init=nn.initializers.zeros)(nn.silu(nn.GroupNorm(GROUPS)(h)))
        return jnp.transpose(out, (0, 3, 1, 2)).astype(x.dtype)


def init_params(key) -> dict:
    return DigitsUNet().init(key, jnp.zeros((1,) + SHAPE), jnp.zeros(()), jnp.zeros((1,), jnp.int32))


def parameter_count(params) -> int:
    return int(sum(np.prod(p.shape) for p in jax.tree_util.tree_leaves(params)))
