"""Batched nonlinear solvers used by exact inversion, each row its own problem: Newton-Krylov
(:mod:`.newton`), restarted GMRES (:mod:`.krylov`) and Anderson acceleration (:mod:`.anderson`).
Generic: they know nothing about diffusion."""
