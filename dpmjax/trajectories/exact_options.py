"""ExactInversion: the settings of exact inversion, one frozen, hashable, validated object.

``dpmjax.invert(..., exact=ExactInversion(tolerance=1e-4))`` inverts exactly with those settings;
``exact=True`` is ``exact=ExactInversion()``, the defaults. Equal objects hash alike, so jit compiles
one program per distinct value (:mod:`dpmjax.trajectories.exact` takes them as a static argument).
"""

from __future__ import annotations

import dataclasses

from .. import checks


@dataclasses.dataclass(frozen=True)
class ExactInversion:
    """Settings of exact inversion: find the start ``z`` of a sampler ``S`` with ``S(z) = x`` to the
    working precision (:mod:`dpmjax.trajectories.exact`).

    The whole multistep sampler is the equation (Hong et al. 2024, "On Exact Inversion of
    DPM-Solvers", CVPR, solve its implicit steps one by one). Orders >= 2 start from plain inversion
    ``I``, make defect-correction sweeps ``z <- z + I(x) - I(S(z))`` (Stetter 1978, "The defect
    correction principle and discretization methods", Numer. Math. 29) and then solve ``S(z) = x``
    with damped Newton-Krylov (Knoll and Keyes 2004, J. Comput. Phys. 193), each linear solve a
    restarted GMRES (Saad and Schultz 1986, SIAM J. Sci. Stat. Comput. 7) right-preconditioned by
    ``I``'s Jacobian. Order 1, and rows the fast path leaves, take the robust path: each step solved
    alone, then history sweeps, then the whole-sampler solve.

    Every field is checked here, at construction: a bad value is a ``ValueError`` naming the field
    and what is allowed.

    Attributes:
        tolerance: The round trip a row must reach, ``max|S(z) - x| / max(1, max|x|)`` per row: it
            is what ``Trajectory.converged`` tests, and it bounds every Newton solve (which stops at a
            tenth of it). A number in ``(0, 1)`` (default ``1e-5``, about 80 float32 roundings).
        max_sweeps: Defect-correction sweeps at most, and history sweeps of the robust path at most
            (an integer >= 0, default 10; 0 goes straight to Newton).
        max_iterations: Newton iterations of every Newton solve at most (an integer >= 1,
            default 30).
        gmres_restart: The Krylov space size of each GMRES cycle in the Newton solves, i.e. the
            model Jacobian-vector products per cycle (an integer >= 1, default 5).
        gmres_maxiter: GMRES restart cycles per linear solve (an integer >= 1, default 1).
        independent_rows: Treat the rows (axis 0) of the sample as independent problems, as they
            are for any model that does not mix the batch: each row gets its own Krylov space, step
            length and stopping test, and a row's result does not depend on the others (default
            True). Pass False for a model that couples rows (batch statistics, attention across
            the batch): the batch is then one problem.
        finish_apart: Where the fast path (orders >= 2) leaves rows unconverged, finish them apart:
            gathered with their rows of ``cond`` into a sub-batch of a fixed size (a power of two)
            and solved there from the best start the whole batch found, so that their further
            model calls are paid for those rows only, not the whole batch; a finished row that,
            sampled in the whole batch, lands just above the tolerance (the two programs round
            differently) gets one defect-correction sweep in the whole batch. ``None`` (default):
            when ``cond`` is given and every leaf of it has the batch's rows on axis 0 (per-row
            labels or embeddings; a model that closes over per-row conditioning cannot be run on
            other rows, and a ``cond`` that also carries weights is finished whole unless ``True``
            is passed) and the call is not being traced (under
            ``jit``, ``grad`` or ``vmap`` the rows to finish are not known when the program is
            built: the batch is then finished whole, masked). ``True`` asks for it with ``cond=None``
            too (the model must then treat each row alone); ``False`` never. Leaves of ``cond``
            whose leading axis has the batch's length are gathered with the rows; a finished row is
            kept only where its round trip, measured in the whole batch with the real ``cond``,
            beats the fast path's (so a leaf used whole that merely has that length cannot fake a
            converged row; pass ``False`` for such a ``cond``).
        max_calls_per_step: A budget: the most model calls per sampler step the solve may make
            (batched calls, each of the whole batch or of the sub-batch of rows finished apart, so
            also the most any one row pays; plain inversion and its check, 2 per step, included; a
            Jacobian-vector product counts as one; ``Trajectory.model_calls`` reports what was
            made). A stage starts only where the calls it makes in any case fit, an iteration only where the
            previous one's cost still fits, so a row may pass it by the iteration under way at
            most. A row the budget stops keeps the best start it met (never worse than plain
            inversion's) and is flagged: ``converged`` is ``False``. Rows finished apart spend what
            the whole batch's pass left them. The budget is the batch program's, as its calls are:
            rows still open when it runs out stop together, so their results can then depend on
            which rows share the batch (rows done before it runs out are not touched); finishing
            hard rows apart keeps that to the hard rows. ``None`` (default): no budget; an integer
            >= 2 otherwise.

    Example:
        >>> import dpmjax
        >>> options = dpmjax.ExactInversion(tolerance=1e-4, max_sweeps=4)
        >>> options == dpmjax.ExactInversion(tolerance=1e-4, max_sweeps=4)
        True
    """

    tolerance: float = 1e-5
    max_sweeps: int = 10
    max_iterations: int = 30
    gmres_restart: int = 5
    gmres_maxiter: int = 1
    independent_rows: bool = True
    finish_apart: bool | None = None
    max_calls_per_step: int | None = None

    def __post_init__(self):
        # normalised to Python numbers, so that equal settings hash alike whatever type was passed
        normalised = {
            "tolerance": checks.real("tolerance", self.tolerance, low=0.0, high=1.0, open_low=True, open_high=True,
                                     note=" (the round trip a row must reach, relative to max(1, max|row|))"),
            "max_sweeps": checks.integer("max_sweeps", self.max_sweeps, 0, note=" (defect-correction sweeps at most)"),
            "max_iterations": checks.integer("max_iterations", self.max_iterations, 1,
                                             note=" (Newton iterations of every Newton solve at most)"),
            "gmres_restart": checks.integer("gmres_restart", self.gmres_restart, 1,
                                            note=" (the Krylov space size of each GMRES cycle)"),
            "gmres_maxiter": checks.integer("gmres_maxiter", self.gmres_maxiter, 1,
                                            note=" (GMRES restart cycles per linear solve)"),
        }
        checks.boolean("independent_rows", self.independent_rows)
        if self.finish_apart is not None:
            checks.boolean("finish_apart", self.finish_apart)
        if self.max_calls_per_step is not None:
            normalised["max_calls_per_step"] = checks.integer(
                "max_calls_per_step", self.max_calls_per_step, 2,
                note=" (model calls per step; plain inversion and its check make 2), or None for no budget")
        for name, value in normalised.items():
            object.__setattr__(self, name, value)

    def replace(self, **changes) -> "ExactInversion":
        """A copy with ``changes`` (checked again)."""
        return dataclasses.replace(self, **changes)


#: The keywords ``invert`` took before the settings became :class:`ExactInversion` fields.
MOVED_KEYWORDS = ("tolerance", "max_sweeps", "max_iterations", "gmres_restart", "gmres_maxiter", "independent_rows")


def moved_keywords_message(function: str, given: dict) -> str:
    """What to write instead of ``function(..., tolerance=..., ...)``: the keywords in ``given``
    (old name -> value) are fields of :class:`ExactInversion` now."""
    fields = ", ".join(f"{name}={value!r}" for name, value in given.items())
    names = ", ".join(given)
    return (f"{function}() no longer takes {names}: exact inversion's settings are one object now. "
            f"Pass exact=dpmjax.ExactInversion({fields}) instead (exact=True is ExactInversion() with its defaults); "
            f"see the migration guide.")


# ``function`` refusing the keywords that moved into ExactInversion with a message that names the
# new call (rather than Python's bare "unexpected keyword argument"); signature and docstring kept
rejects_moved_keywords = checks.rejects_keywords(MOVED_KEYWORDS, moved_keywords_message)


def resolved(name: str, value) -> "ExactInversion | None":
    """``exact=`` as given -> the settings (``True`` -> ``ExactInversion()``), or ``None`` for plain
    inversion (``False``); anything else is a ``ValueError`` naming ``name``."""
    if isinstance(value, ExactInversion):
        return value
    if value is True:
        return ExactInversion()
    if value is False:
        return None
    raise ValueError(f"{name} must be True, False or a dpmjax.ExactInversion (exact inversion's settings), got {value!r}.")
