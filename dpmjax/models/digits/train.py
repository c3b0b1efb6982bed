"""Train the shipped digits models (:mod:`dpmjax.models.digits`) and their scoring classifier.

    pip install ".[train]"                      # scikit-learn, for the dataset
    python -m dpmjax.models.digits.train        # ~minutes on 2 CPU cores; writes the package's files

Fixed seeds throughout: the split (numpy seed 0), the initialisation and the batches (JAX key 0).
Epsilon-prediction loss on diffusers' default training schedule, AdamW with warm-up and cosine
decay (optax), labels dropped to the null label with probability 0.15.
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import tempfile
import time

import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import optax

from ...config import SchedulerConfig
from ...noise_schedule import training_schedule
from . import common, mlp, unet

LABEL_DROPOUT = 0.15


def load_split(test_fraction: float = 0.2, seed: int = 0):
    """``(train_images, train_labels, test_images, test_labels)``, images ``[N, 1, 8, 8]`` in [-1, 1]."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:  # pragma: no cover
        raise SystemExit('training needs scikit-learn for the dataset: pip install ".[train]"') from None
    data = load_digits()
    images = (data.images.astype(np.float32) / 16.0 * 2.0 - 1.0)[:, None]
    labels = data.target.astype(np.int32)
    order = np.random.default_rng(seed).permutation(len(labels))
    n_test = int(round(test_fraction * len(labels)))
    test, train = order[:n_test], order[n_test:]
    return images[train], labels[train], images[test], labels[test]


def train_denoiser(images, labels, steps: int, batch: int = 256, learning_rate: float = 2e-3, seed: int = 0,
                   log_every: int = 1000, model: str = "mlp"):
    alphas_cumprod = jnp.asarray(training_schedule(SchedulerConfig()).alphas_cumprod, jnp.float32)
    key = jax.random.PRNGKey(seed)
    params = (mlp.init_params if model == "mlp" else unet.init_params)(key)
    schedule = optax.warmup_cosine_decay_schedule(0.0, learning_rate, min(500, steps // 10 + 1), steps, learning_rate * 0.01)
    optimiser = optax.adamw(schedule, weight_decay=1e-4)
    opt_state = optimiser.init(params)
    net = mlp.DigitsDenoiser() if model == "mlp" else unet.DigitsUNet()
    images, labels = jnp.asarray(images), jnp.asarray(labels)

    def loss_fn(params, key):
        k_idx, k_t, k_eps, k_drop = jax.random.split(key, 4)
        idx = jax.random.randint(k_idx, (batch,), 0, images.shape[0])
        x0, y = images[idx], labels[idx]
        t = jax.random.randint(k_t, (batch,), 0, alphas_cumprod.shape[0])
        eps = jax.random.normal(k_eps, x0.shape)
        a = alphas_cumprod[t].reshape(-1, 1, 1, 1)
        xt = jnp.sqrt(a) * x0 + jnp.sqrt(1.0 - a) * eps
        y = jnp.where(jax.random.uniform(k_drop, (batch,)) < LABEL_DROPOUT, common.NULL_LABEL, y)
        return jnp.mean((net.apply(params, xt, t, y) - eps) ** 2)

    def train_step(carry, k):
        params, opt_state = carry
        loss, grads = jax.value_and_grad(loss_fn)(params, k)
        updates, opt_state = optimiser.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), loss

    @jax.jit
    def run_scanned(params, opt_state, key):
        (params, opt_state), losses = jax.lax.scan(train_step, (params, opt_state), jax.random.split(key, log_every))
        return params, opt_state, jnp.mean(losses)

    step = jax.jit(train_step)

    def run_looped(params, opt_state, key):
        # XLA:CPU runs the UNet's convolutions ~20x slower inside a scan's loop body than as a
        # top-level program (measured: 1.2 s vs 0.057 s per step at batch 128), so one call per step
        losses = []
        for k in jax.random.split(key, log_every):
            (params, opt_state), loss = step((params, opt_state), k)
            losses.append(loss)
        return params, opt_state, jnp.mean(jnp.stack(losses))

    run = run_scanned if model == "mlp" else run_looped

    start = time.perf_counter()
    done = 0
    while done < steps:
        key, sub = jax.random.split(key)
        params, opt_state, loss = run(params, opt_state, sub)
        done += log_every
        print(f"step {done}/{steps}: loss {float(loss):.4f} ({time.perf_counter() - start:.0f} s)", flush=True)
    return params


def train_classifier(images, labels, steps: int = 2000):
    """Multinomial logistic regression on the 64 pixels (L2 1e-3), full batch, optax Adam."""
    x = jnp.asarray(images.reshape(len(images), -1))
    y = jnp.asarray(labels)
    params = (jnp.zeros((64, 10)), jnp.zeros(10))
    optimiser = optax.adam(0.05)

    def loss_fn(p):
        logits = x @ p[0] + p[1]
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean() + 1e-3 * jnp.sum(p[0] ** 2)

    @jax.jit
    def fit(params):
        def descent_step(carry, _):
            params, state = carry
            grads = jax.grad(loss_fn)(params)
            updates, state = optimiser.update(grads, state)
            return (optax.apply_updates(params, updates), state), None

        return jax.lax.scan(descent_step, (params, optimiser.init(params)), None, length=steps)[0][0]

    return fit(params)


def _write_whole(path: str, data: bytes) -> None:
    """``data`` at ``path``, whole or not at all: a temporary file beside it, synced, renamed."""
    fd, temporary = tempfile.mkstemp(prefix=os.path.basename(path) + ".", suffix=".tmp", dir=os.path.dirname(path) or ".")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.unlink(temporary)
        raise


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dpmjax.models.digits.train", description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="mlp", choices=common.MODELS,
                        help="mlp (the residual MLP) or unet (the Stable-Diffusion-style UNet); default mlp")
    parser.add_argument("--steps", type=int, default=None, help="optimiser steps (default: mlp 20000, unet 6000)")
    parser.add_argument("--out", default="digits-weights",
                        help="folder for the weights (and, for the MLP, digits_heldout.npz); default ./digits-weights: "
                             "the shipped weights are replaced only when --out is their folder, dpmjax.models.digits.HERE")
    args = parser.parse_args(argv)
    steps = args.steps if args.steps is not None else (20000 if args.model == "mlp" else 6000)
    if steps < 1:
        parser.error("--steps must be positive")
    train_x, train_y, test_x, test_y = load_split()
    print(f"digits: {len(train_y)} training images, {len(test_y)} held out; model {args.model}")
    log_every = min(1000 if args.model == "mlp" else 250, steps)
    batch = 256 if args.model == "mlp" else 128
    params = train_denoiser(train_x, train_y, -(-steps // log_every) * log_every, batch=batch, log_every=log_every,
                            model=args.model)
    if args.model == "unet":  # scored by the MLP's classifier: same data, same split
        os.makedirs(args.out, exist_ok=True)
        path = os.path.join(args.out, os.path.basename(common.weights_path("unet")))
        _write_whole(path, flax.serialization.to_bytes(params))
        print(f"wrote {path}")
        return 0
    classifier = train_classifier(train_x, train_y)
    accuracy = float(jnp.mean(common.classify(classifier, jnp.asarray(test_x)) == test_y))
    print(f"classifier accuracy on the held-out digits: {accuracy:.3f}")
    os.makedirs(args.out, exist_ok=True)
    payload = {"params": params, "classifier": tuple(np.asarray(a) for a in classifier)}
    _write_whole(os.path.join(args.out, "digits_weights.msgpack"), flax.serialization.to_bytes(payload))
    held_out = io.BytesIO()
    np.savez_compressed(held_out, images=test_x.astype(np.float32), labels=test_y)
    _write_whole(os.path.join(args.out, "digits_heldout.npz"), held_out.getvalue())
    print(f"wrote {args.out}/digits_weights.msgpack and digits_heldout.npz")
    return 0


if __name__ == "__main__":
    sys.exit(main())
