"""What one sampler step costs at Stable Diffusion 1.x's size: its UNet (diffusers 0.39's
``FlaxUNet2DConditionModel`` with SD 1.x's config: 320-640-1280-1280 channels, cross-attention
width 768, 859.5 M parameters) and its VAE at 512 x 512 px (64 x 64 latents), random weights, on this
machine. One guided step of plain inversion or sampling is one UNet call on a doubled batch
(``[uncond; text]``); exact inversion makes ``calls per step`` of them (the exact-inversion guide);
null-text inversion ``inner_steps`` forward-and-backward passes more.

    PYTHONPATH=<diffusers 0.39>:<transformers 4.x> python -m benchmarks.sd_unet_cost [--dtype bfloat16] [--images 1]

Prints one line per measurement (compile seconds, call seconds: the median of ``--repeats``, the
parameters' bytes, the process' peak resident memory); the numbers a 2-core CPU gives are in
benchmarks/results/sd_unet_cost.txt. GPU and TPU figures come from the same command there.
"""

from __future__ import annotations

import argparse
import logging
import resource
import statistics
import time
import warnings

warnings.filterwarnings("ignore")
logging.disable(logging.WARNING)  # diffusers 0.39 warns at every Flax module it builds


def _peak_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB


def _timed(fn, *args, repeats: int):
    start = time.perf_counter()
    out = fn(*args)
    jax_block(out)
    first = time.perf_counter() - start
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax_block(fn(*args))
        times.append(time.perf_counter() - start)
    return first, statistics.median(times)


def jax_block(tree):
    import jax

    jax.tree_util.tree_map(lambda a: a.block_until_ready() if hasattr(a, "block_until_ready") else a, tree)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.sd_unet_cost", description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--images", type=int, default=1, help="images per call (the UNet sees twice as many)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--skip-vae", action="store_true")
    args = parser.parse_args(argv)

    import jax
    import jax.numpy as jnp

    from dpmjax.models.flax_sd import guided_unet
    from dpmjax.models.flax_sd.edit import _decoder, _encoder
    from dpmjax.models.flax_sd.requirements import old_diffusers
    from dpmjax.models.flax_sd.testing import random_params
    from dpmjax.models.flax_sd.unet import UNetInputs, cast_floating

    diffusers = old_diffusers()
    dtype = jnp.bfloat16 if args.dtype == "bfloat16" else jnp.float32
    print(f"device: {jax.devices()[0].device_kind} x{jax.device_count()}, dtype {args.dtype}, {args.images} image(s)")
    unet = diffusers.FlaxUNet2DConditionModel(sample_size=64, cross_attention_dim=768, dtype=dtype)  # SD 1.x's config
    shapes = jax.eval_shape(lambda: unet.init(jax.random.PRNGKey(0), jnp.zeros((1, 4, 64, 64)), jnp.zeros((1,)),
                                              jnp.zeros((1, 77, 768))))["params"]
    start = time.perf_counter()
    params = cast_floating(random_params(shapes, seed=0), dtype)
    count = sum(a.size for a in jax.tree_util.tree_leaves(params))
    nbytes = sum(a.nbytes for a in jax.tree_util.tree_leaves(params))
    print(f"unet: {count / 1e6:.1f} M parameters, {nbytes / 2**30:.2f} GiB ({time.perf_counter() - start:.0f} s to fill); "
          f"peak RSS {_peak_gib():.1f} GiB")
    b = args.images
    latents = jax.random.normal(jax.random.PRNGKey(1), (b, 4, 64, 64))
    text = jax.random.normal(jax.random.PRNGKey(2), (b, 77, 768))
    inputs = UNetInputs(params, text, jnp.zeros_like(text))
    model_fn = guided_unet(unet, 7.5)
    step = jax.jit(lambda x, t, c: model_fn(x, t, c))
    first, call = _timed(step, latents, jnp.asarray(500), inputs, repeats=args.repeats)
    print(f"guided UNet call ([{2 * b}, 4, 64, 64]): first call (compile included) {first:.1f} s, then {call:.2f} s; "
          f"peak RSS {_peak_gib():.1f} GiB")
    if args.skip_vae:
        return
    vae = diffusers.FlaxAutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, sample_size=512,
                                      down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                                      block_out_channels=(128, 256, 512, 512), layers_per_block=2, dtype=dtype,
                                      scaling_factor=0.18215)
    vae_params = cast_floating(random_params(jax.eval_shape(lambda: vae.init_weights(jax.random.PRNGKey(0))), seed=1), dtype)
    pixels = jax.random.uniform(jax.random.PRNGKey(3), (b, 512, 512, 3))
    first, call = _timed(_encoder(vae), vae_params, pixels, repeats=args.repeats)
    print(f"VAE encode ({b} x 512 x 512): first call {first:.1f} s, then {call:.2f} s; peak RSS {_peak_gib():.1f} GiB")
    first, call = _timed(_decoder(vae), vae_params, latents, repeats=args.repeats)
    print(f"VAE decode ({b} x 64 x 64 latents): first call {first:.1f} s, then {call:.2f} s; peak RSS {_peak_gib():.1f} GiB")


if __name__ == "__main__":
    main()
