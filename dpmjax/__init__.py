"""dpmjax: DPM-Solver multistep schedulers (sampling and inversion) as pure JAX functions."""

from .config import SchedulerConfig
from .flax_compat import (
    FlaxDPMSolverMultistepScheduler,
    FlaxDPMSolverMultistepSchedulerOutput,
)
from .scheduler import (
    DPMSolverMultistepBase,
    DPMSolverMultistepInverseScheduler,
    DPMSolverMultistepScheduler,
    SchedulerOutput,
)
from .state import SchedulerState
from .trajectories.diffedit import DiffEdit, DiffEditResult, diffedit, diffedit_mask
from .trajectories.exact_options import ExactInversion
from .trajectories.guidance import classifier_free_guidance
from .trajectories.inversion import invert
from .trajectories.learn_grid import LearnedGrid, learn_grid
from .trajectories.model_fn import ConditionalModelFn, ModelFn, ParametrisedModelFn
from .trajectories.null_text import (
    NullTextInversion,
    null_text_inversion,
    sample_with_null_embeddings,
)
from .trajectories.scan import Trajectory, sample
from .trajectories.step_check import StepInversionCheck, check_step_inversion
from .version import __version__

__all__ = [
    "ConditionalModelFn",
    "DPMSolverMultistepBase",
    "DPMSolverMultistepInverseScheduler",
    "DPMSolverMultistepScheduler",
    "DiffEdit",
    "DiffEditResult",
    "ExactInversion",
    "FlaxDPMSolverMultistepScheduler",
    "FlaxDPMSolverMultistepSchedulerOutput",
    "LearnedGrid",
    "ModelFn",
    "NullTextInversion",
    "ParametrisedModelFn",
    "SchedulerConfig",
    "SchedulerOutput",
    "SchedulerState",
    "StepInversionCheck",
    "Trajectory",
    "check_step_inversion",
    "classifier_free_guidance",
    "diffedit",
    "diffedit_mask",
    "invert",
    "learn_grid",
    "null_text_inversion",
    "sample",
    "sample_with_null_embeddings",
    "__version__",
]
