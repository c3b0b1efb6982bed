"""Configs: validation with clear errors, diffusers' scheduler_config.json both ways, switching."""

from __future__ import annotations

import json
import math
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import dpmjax
from conftest import SHAPE, make_diffusers
from dpmjax import DPMSolverMultistepInverseScheduler as Inverse
from dpmjax import DPMSolverMultistepScheduler as Forward
from dpmjax import SchedulerConfig

# A Stable Diffusion v1.5 scheduler folder, as the checkpoint ships it (a PNDM config).
SD15_SCHEDULER = {
    "_class_name": "PNDMScheduler",
    "_diffusers_version": "0.6.0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
    "clip_sample": False,
}


@pytest.mark.parametrize(
    "kwargs, parameter",
    [
        (dict(solver_order=4), "solver_order"),
        (dict(algorithm_type="ddim"), "algorithm_type"),
        (dict(solver_type="rk4"), "solver_type"),
        (dict(prediction_type="score"), "prediction_type"),
        (dict(beta_schedule="cosine"), "beta_schedule"),
        (dict(timestep_spacing="uniform"), "timestep_spacing"),
        (dict(final_sigmas_type="one"), "final_sigmas_type"),
        (dict(variance_type="fixed_small"), "variance_type"),
        (dict(num_train_timesteps=0), "num_train_timesteps"),
        (dict(beta_start=-0.1), "beta_start"),
        (dict(beta_end=1.5), "beta_end"),
        (dict(dynamic_thresholding_ratio=1.5), "dynamic_thresholding_ratio"),
        (dict(sample_max_value=0.0), "sample_max_value"),
        (dict(flow_shift=-1.0), "flow_shift"),
        (dict(steps_offset=-1), "steps_offset"),
        (dict(thresholding="yes"), "thresholding"),
        (dict(lambda_min_clipped=float("nan")), "lambda_min_clipped"),
        (dict(use_karras_sigmas=True, use_beta_sigmas=True), "use_karras_sigmas"),
        (dict(use_lu_lambdas=True, use_flow_sigmas=True), "use_lu_lambdas"),
        (dict(trained_betas=[0.1, 0.2]), "trained_betas"),
        (dict(prediction_type="flow_prediction", algorithm_type="dpmsolver"), "flow_prediction"),
        (dict(use_dynamic_shifting=True), "use_dynamic_shifting"),
        (dict(solver_orderr=2), "solver_orderr"),
        (dict(channel_axis=1.5), "channel_axis"),
        (dict(steps_offset=1000), "steps_offset"),
        (dict(num_train_timesteps=2**21), "num_train_timesteps"),
        (dict(trained_betas="0.01"), "trained_betas"),
        (dict(num_train_timesteps=2, trained_betas=[0.01, None]), "trained_betas"),
    ],
)
def test_bad_parameters_name_themselves(kwargs, parameter):
    for cls in (Forward, Inverse):
        with pytest.raises(ValueError, match=parameter):
            cls(**kwargs)


def test_direction_specific_refusals():
    with pytest.raises(ValueError, match="final_sigmas_type"):
        Forward(algorithm_type="dpmsolver")  # diffusers refuses this too
    Inverse(algorithm_type="dpmsolver")  # the inverse scheduler has no final sigma


@pytest.mark.parametrize("cls", [Forward, Inverse])
def test_set_timesteps_validates_before_tracing(cls):
    s = cls()
    state = s.create_state()
    for n in (0, -3, 1001, 2.5, True):
        with pytest.raises(ValueError, match="num_inference_steps"):
            s.set_timesteps(state, n, SHAPE)
    with pytest.raises(ValueError, match="shape"):
        s.set_timesteps(state, 10)
    with pytest.raises(ValueError, match="dtype"):
        s.set_timesteps(state, 10, SHAPE, dtype=jnp.int32)
    with pytest.raises(ValueError, match="state first"):
        s.set_timesteps(10, SHAPE)
    with pytest.raises(ValueError, match="leading"):
        cls(timestep_spacing="leading").set_timesteps(state, 1000, SHAPE)
    with pytest.raises(ValueError, match="set_timesteps"):
        s.step(state, jnp.zeros(SHAPE), 0, jnp.zeros(SHAPE))


def test_step_validates_shapes_and_dtypes():
    s = Forward()
    state = s.set_timesteps(s.create_state(), 10, SHAPE)
    x = jnp.zeros(SHAPE)
    with pytest.raises(ValueError, match="model_output shape"):
        s.step(state, jnp.zeros((2, 4, 8, 9)), 999, x)
    with pytest.raises(ValueError, match="set_timesteps"):
        s.step(state, jnp.zeros((1, 4, 8, 8)), 999, jnp.zeros((1, 4, 8, 8)))
    with pytest.raises(ValueError, match="floating"):
        s.step(state, jnp.zeros(SHAPE, jnp.int32), 999, x)
    with pytest.raises(ValueError, match="twice the sample's channels"):
        learned = Forward(variance_type="learned")
        learned.step(learned.set_timesteps(learned.create_state(), 10, SHAPE), x, 999, x)


def test_custom_timesteps_and_mu_are_checked():
    s = Forward()
    state = s.create_state()
    got = s.set_timesteps(state, shape=SHAPE, timesteps=[999, 500, 10])
    np.testing.assert_array_equal(np.asarray(got.timesteps), [999, 500, 10])
    for bad in ([10, 500], [1000, 10], [5.5, 1]):
        with pytest.raises(ValueError, match="timesteps"):
            s.set_timesteps(state, shape=SHAPE, timesteps=bad)
    with pytest.raises(ValueError, match="exactly one"):
        s.set_timesteps(state, 10, SHAPE, timesteps=[999, 10])
    with pytest.raises(ValueError, match="mu"):
        s.set_timesteps(state, 10, SHAPE, mu=0.5)
    flow = Forward(use_flow_sigmas=True, use_dynamic_shifting=True, prediction_type="flow_prediction")
    shifted = flow.set_timesteps(flow.create_state(), 10, SHAPE, mu=math.log(3.0))
    reference = Forward(use_flow_sigmas=True, flow_shift=3.0, prediction_type="flow_prediction")
    np.testing.assert_allclose(np.asarray(shifted.sigmas), np.asarray(reference.set_timesteps(reference.create_state(), 10, SHAPE).sigmas), rtol=1e-6)
    with pytest.raises(ValueError, match="inverse"):
        Inverse().set_timesteps(state, shape=SHAPE, timesteps=[1, 2])


def test_custom_timesteps_match_diffusers():
    d = make_diffusers("forward")
    d.set_timesteps(timesteps=[999, 700, 301, 20])
    s = Forward()
    state = s.set_timesteps(s.create_state(), shape=SHAPE, timesteps=[999, 700, 301, 20])
    np.testing.assert_allclose(np.asarray(state.sigmas), d.sigmas.numpy(), rtol=2e-6)


@pytest.mark.parametrize("option", SchedulerConfig.SIGMA_GRID_OPTIONS)
def test_custom_timesteps_are_refused_with_every_sigma_grid(option):
    """Each alternative grid sets its own timesteps: custom ones are a ValueError naming the flag."""
    s = Forward(**{option: True})
    with pytest.raises(ValueError, match=f"custom timesteps cannot be combined with {option}=True"):
        s.set_timesteps(s.create_state(), shape=SHAPE, timesteps=[999, 500, 10])


def test_a_new_sigma_grid_flag_is_honoured_wherever_the_flags_are_read(monkeypatch):
    """A flag added to ``SIGMA_GRID_OPTIONS`` alone is type-checked, exclusive of the others, refused
    with custom timesteps and frees ``steps_offset``: no place keeps its own copy of the list."""
    monkeypatch.setattr(SchedulerConfig, "SIGMA_GRID_OPTIONS", SchedulerConfig.SIGMA_GRID_OPTIONS + ("use_new_sigmas",))
    monkeypatch.setattr(SchedulerConfig, "use_new_sigmas", "yes", raising=False)
    with pytest.raises(ValueError, match="use_new_sigmas must be"):
        SchedulerConfig()
    monkeypatch.setattr(SchedulerConfig, "use_new_sigmas", True)
    with pytest.raises(ValueError, match="use_karras_sigmas and use_new_sigmas are mutually exclusive"):
        SchedulerConfig(use_karras_sigmas=True)
    s = Forward(SchedulerConfig())  # equal to the default config: timesteps no other test asks for miss the grid cache
    with pytest.raises(ValueError, match="custom timesteps cannot be combined with use_new_sigmas=True"):
        s.set_timesteps(s.create_state(), shape=SHAPE, timesteps=[997, 503, 11])
    # the offset check is skipped for a grid that sets its own timesteps (the spaced ones are used here)
    late = Forward(SchedulerConfig(timestep_spacing="leading", steps_offset=990))
    late.set_timesteps(late.create_state(), 25, SHAPE)


def test_config_is_frozen_hashable_and_schedulers_compare_by_config():
    a, b = Forward(solver_order=3), Forward(solver_order=3)
    assert a == b and hash(a) == hash(b) and a != Forward() and a != Inverse(solver_order=3)
    with pytest.raises(Exception):
        a.config.solver_order = 2  # frozen
    assert {a.config: 1}[b.config] == 1


@pytest.mark.parametrize("cls", [Forward, Inverse])
def test_save_and_load_round_trip(tmp_path, cls):
    s = cls(solver_order=3, thresholding=True, trained_betas=list(np.linspace(1e-4, 0.02, 1000)), lambda_min_clipped=-5.1)
    path = s.save_pretrained(tmp_path / "scheduler")
    saved = json.loads(open(path).read())
    assert saved["_class_name"] == cls.__name__
    assert cls.from_pretrained(tmp_path / "scheduler") == s
    assert cls.from_pretrained(tmp_path, subfolder="scheduler") == s
    assert cls.from_pretrained(path) == s
    with pytest.raises(FileNotFoundError, match="scheduler_config.json"):
        cls.from_pretrained(tmp_path / "missing")


def test_default_lambda_min_clipped_round_trips_as_minus_infinity(tmp_path):
    Forward().save_pretrained(tmp_path)
    assert Forward.from_pretrained(tmp_path).config.lambda_min_clipped == -math.inf


def test_a_stable_diffusion_scheduler_folder_loads_as_it_is(tmp_path):
    folder = tmp_path / "stable-diffusion-v1-5" / "scheduler"
    folder.mkdir(parents=True)
    (folder / "scheduler_config.json").write_text(json.dumps(SD15_SCHEDULER))
    s = Inverse.from_pretrained(tmp_path / "stable-diffusion-v1-5", subfolder="scheduler")
    assert s.config.beta_schedule == "scaled_linear" and s.config.steps_offset == 1
    d = _diffusers().DPMSolverMultistepInverseScheduler.from_pretrained(str(tmp_path / "stable-diffusion-v1-5"), subfolder="scheduler")
    d.set_timesteps(50)
    state = s.set_timesteps(s.create_state(), 50, SHAPE)
    np.testing.assert_array_equal(np.asarray(state.timesteps), d.timesteps.numpy())
    np.testing.assert_allclose(np.asarray(state.sigmas), d.sigmas.numpy(), rtol=2e-6)


@pytest.mark.parametrize("cls", [Forward, Inverse])
def test_diffusers_reads_what_we_write_and_we_read_what_diffusers_writes(tmp_path, cls):
    ours = cls(solver_order=3, algorithm_type="dpmsolver", final_sigmas_type="sigma_min", use_karras_sigmas=True)
    ours.save_pretrained(tmp_path / "ours")
    theirs_cls = getattr(_diffusers(), cls.__name__)
    theirs = theirs_cls.from_pretrained(str(tmp_path / "ours"))
    assert theirs.config.solver_order == 3 and theirs.config.use_karras_sigmas
    theirs.save_config(str(tmp_path / "theirs"))
    assert cls.from_pretrained(tmp_path / "theirs").config.replace(final_sigmas_type="sigma_min") == ours.config


def test_configs_move_between_schedulers_like_diffusers():
    inverse = Inverse(solver_order=3, prediction_type="v_prediction")
    forward = Forward.from_config(inverse.config)
    assert Inverse.from_config(forward.config) == inverse
    assert Forward.from_config(dict(SD15_SCHEDULER)).config.steps_offset == 1
    ddim_like = {"_class_name": "DDIMScheduler", "clip_sample": True, "set_alpha_to_one": False, "beta_schedule": "linear"}
    assert Inverse.from_config(ddim_like) == Inverse()
    deis_like = {"algorithm_type": "deis", "solver_type": "logrho"}
    assert Forward.from_config(deis_like).config.algorithm_type == "dpmsolver++"
    assert Forward.from_config(deis_like).config.solver_type == "midpoint"
    d = make_diffusers("inverse", solver_order=3)
    assert Inverse.from_config(dict(d.config)) == Inverse(solver_order=3)
    with pytest.raises(ValueError, match="solver_orderr"):
        Forward.from_config({}, solver_orderr=1)


@settings(max_examples=60, deadline=None, derandomize=True)
@given(
    order=st.sampled_from([1, 2, 3]),
    algorithm=st.sampled_from(["dpmsolver++", "sde-dpmsolver++"]),
    spacing=st.sampled_from(["linspace", "leading", "trailing"]),
    ratio=st.floats(0.5, 1.0),
    max_value=st.floats(0.5, 5.0),
    clip=st.sampled_from([-math.inf, -5.1, -3.0]),
    offset=st.integers(0, 3),
)
def test_config_dict_round_trip_property(order, algorithm, spacing, ratio, max_value, clip, offset):
    config = SchedulerConfig(solver_order=order, algorithm_type=algorithm, timestep_spacing=spacing,
                             dynamic_thresholding_ratio=ratio, sample_max_value=max_value,
                             lambda_min_clipped=clip, steps_offset=offset)
    assert SchedulerConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config


def _diffusers():
    import diffusers

    return diffusers


def _pyproject() -> dict:
    import tomllib  # Python >= 3.11, where the tests run

    return tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())


def test_the_version_is_pyprojects_and_saved_configs_carry_it(tmp_path):
    version = _pyproject()["project"]["version"]
    assert dpmjax.__version__ == version
    assert json.loads(Path(Forward().save_pretrained(tmp_path)).read_text())["_dpmjax_version"] == version


def test_a_source_tree_without_metadata_reads_its_pyproject(monkeypatch, tmp_path):
    from importlib import metadata

    from dpmjax import version

    def missing(name):
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(metadata, "version", missing)
    assert version.package_version() == _pyproject()["project"]["version"]
    other = tmp_path / "pyproject.toml"
    other.write_text('[project]\nname = "other"\nversion = "9.9"\n')
    assert version.source_tree_version(other) == version.UNKNOWN
    other.write_text('[tool.x]\nversion = "1"\n\n[project]\nname = "dpmjax"\nversion = "2.3.4"\n\n[tool.y]\nversion = "5"\n')
    assert version.source_tree_version(other) == "2.3.4"
    assert version.source_tree_version(tmp_path / "missing.toml") == version.UNKNOWN


def test_package_exports():
    assert dpmjax.__version__
    for name in dpmjax.__all__:
        assert hasattr(dpmjax, name)
