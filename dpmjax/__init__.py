"""dpmjax: DPM-Solver multistep schedulers (sampling and inversion) as pure JAX functions."""

from .config import SchedulerConfig
from .flax_compat import FlaxDPMSolverMultistepScheduler, FlaxDPMSolverMultistepSchedulerOutput
from .scheduler import (
    DPMSolverMultistepInverseScheduler,
    DPMSolverMultistepScheduler,
    SchedulerOutput,
    __version__,
)
from .null_text import NullTextInversion, null_text_inversion, sample_with_null_embeddings
from .state import SchedulerState
from .step_inversion_check import StepInversionCheck, check_step_inversion
from .trajectory import Trajectory, classifier_free_guidance, invert, sample

__all__ = [
    "DPMSolverMultistepInverseScheduler",
    "DPMSolverMultistepScheduler",
    "FlaxDPMSolverMultistepScheduler",
    "FlaxDPMSolverMultistepSchedulerOutput",
    "NullTextInversion",
    "SchedulerConfig",
    "SchedulerOutput",
    "SchedulerState",
    "StepInversionCheck",
    "Trajectory",
    "check_step_inversion",
    "classifier_free_guidance",
    "invert",
    "null_text_inversion",
    "sample",
    "sample_with_null_embeddings",
    "__version__",
]
