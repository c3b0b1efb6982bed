"""The one check of what Flax Stable Diffusion needs from Hugging Face: diffusers < 0.40 (the last
releases with Flax classes) and, for the pipelines' Flax CLIP text encoders, transformers < 5.

Every part of dpmjax that imports diffusers goes through :func:`old_diffusers`: the UNet loader,
the pipelines' scheduler, the test fixtures and the ``dpmjax edit`` command. Its ImportError says
what was found and what to install.
"""

from __future__ import annotations

import importlib

INSTALL = 'pip install "diffusers<0.40" "transformers<5" flax'
# the first release of each without Flax classes, and how the message says it
LIMITS = {"diffusers": ((0, 40), "0.40"), "transformers": ((5, 0), "5")}


def _problem(name: str):
    """What is wrong with the installed ``name`` (``"diffusers missing"``, ``"diffusers 0.40.0"``), or ``None``."""
    try:
        module = importlib.import_module(name)
        version = tuple(int(part) for part in module.__version__.split(".")[:2])
    except Exception:  # noqa: BLE001 - missing, or broken by a mismatched dependency
        return f"{name} missing"
    return f"{name} {module.__version__}" if version >= LIMITS[name][0] else None


def old_diffusers(*, transformers: bool = False):
    """The ``diffusers`` module, once diffusers < 0.40 is installed with its Flax classes (and, with
    ``transformers=True``, transformers < 5 and diffusers' Flax Stable Diffusion pipeline).

    Args:
        transformers: Also require transformers < 5 (the Flax CLIP text encoder of diffusers'
            pipelines) and check that ``diffusers.FlaxStableDiffusionPipeline`` imports.

    Returns:
        The ``diffusers`` module.

    Raises:
        ImportError: One of them is missing, too new, or its Flax classes fail to import; the
            message names what was found and says what to install.
    """
    names = ("diffusers", "transformers") if transformers else ("diffusers",)
    found = [problem for problem in map(_problem, names) if problem]
    if not found:
        try:
            importlib.import_module("diffusers.schedulers.scheduling_utils_flax")  # needs flax
            if transformers:
                from diffusers import FlaxStableDiffusionPipeline  # noqa: F401 - needs transformers' Flax CLIP
        except Exception as error:  # noqa: BLE001 - e.g. flax missing
            found.append(f"the Flax classes failed to import ({type(error).__name__})")
    if found:
        needs = " and ".join(f"{name} < {LIMITS[name][1]}" for name in names)
        raise ImportError(f"Flax Stable Diffusion needs {needs}, the last releases with Flax classes "
                          f"(found {', '.join(found)}): {INSTALL}")
    return importlib.import_module("diffusers")
