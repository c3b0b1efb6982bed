"""How many copies of the model exact inversion's compiled program holds.

XLA inlines the model at every place the program evaluates it (each traced call, each
Jacobian-vector product), and compiling a program takes time in proportion: with the solvers below,
the robust program for one row of the shipped UNet compiles in 41 s (77 s when they evaluated the
model at 20 more places: the order-2 count below went from 47 to 27). The solvers are
built to evaluate the model at as few places as they can: GMRES with one cycle traces no restart
product, a Newton line search evaluates its full step and its halvings at one place, and the robust
path's first-order solve is the first pass of the history-sweep loop. This counts the copies in the
lowered program of ``dpmjax.invert`` (no compilation) with a model made of one convolution."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest
from jax import lax

import dpmjax

KERNEL = jnp.full((1, 1, 3, 3), 0.05)


def model(x, t):
    """One convolution per evaluation (its Jacobian-vector product is one more): counting the
    convolutions in the program counts the model's copies."""
    return 0.5 * x + lax.conv_general_dilated(x, KERNEL, (1, 1), "SAME")


def copies(order: int, **settings) -> int:
    fwd = dpmjax.DPMSolverMultistepScheduler(solver_order=order, final_sigmas_type="sigma_min", use_lu_lambdas=True)
    exact = dpmjax.ExactInversion(finish_apart=False, **settings)
    lowered = jax.jit(lambda x: dpmjax.invert(model, x, fwd, num_inference_steps=10, exact=exact).sample).lower(
        jnp.ones((4, 1, 8, 8)))
    return lowered.as_text().count("stablehlo.convolution")


@pytest.mark.parametrize("order, most", [(1, 19), (2, 27), (3, 27)])
def test_exact_inversion_holds_few_copies_of_the_model(order, most):
    """Measured: 19 (order 1), 27 (orders 2-3: the fast path's 12 with the final path, the robust
    path's 15); before the solvers shared their evaluations, 26 and 47. A second GMRES cycle
    adds its restart product (6 more), nothing else."""
    count = copies(order)
    assert 10 <= count <= most, count
    assert copies(order, gmres_maxiter=2) <= count + 6
