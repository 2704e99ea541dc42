"""The numpy spaced-DDPM sampler driven by the tiny ONNX UNet reproduces the reference loops."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from adaptbir.runtime.backends import Engines
from adaptbir.runtime.sampler import NoiseSource, SamplerStep, Schedule, sample, spaced_timesteps, step

GOLDEN_BACKENDS = ["ort-cpu", "openvino-f32"]  # OpenVINO in f32 meets the same contract with the same tolerances


def engines_on(directory, backend: str) -> Engines:
    if backend == "openvino-f32":  # the openvino extra is part of the test install: never skipped
        return Engines.load(directory, backend="openvino", precision="f32")
    return Engines.load(directory, backend=backend)

SCHEDULE_FIELDS = ("betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_recip_alphas_cumprod",
                   "sqrt_recipm1_alphas_cumprod", "posterior_variance", "posterior_mean_coef1", "posterior_mean_coef2")
FINAL_TOL = {"sampler": 1e-3, "sampler_50": 2e-3}  # reference README §8 (values reach ~80)


def _reference_timesteps(steps: int) -> list[int]:
    """The reference rule written independently: running float64 sums of the stride, rounded half to even."""
    positions = itertools.accumulate(itertools.repeat(999 / (steps - 1), steps - 1), initial=0.0)
    return sorted({round(p) for p in positions})


def test_timestep_rule_for_every_step_count():
    for steps in range(2, 1001):
        assert spaced_timesteps(steps).tolist() == _reference_timesteps(steps), steps


@pytest.mark.parametrize("case", sorted(FINAL_TOL))
def test_schedule_arrays_match(golden, case):
    g = golden(case)
    schedule = Schedule.create(int(g["steps"]))
    np.testing.assert_array_equal(schedule.timesteps, g["sched_spaced_timesteps"])
    for name in SCHEDULE_FIELDS:
        # float64 arithmetic in the same order: equal, or within a couple of ulps where numpy's linspace
        # differs from torch's in the last bit (reference README §3.7)
        np.testing.assert_allclose(getattr(schedule, name), g[f"sched_{name}"], rtol=1e-13, atol=0, err_msg=name)
        assert np.array_equal(getattr(schedule, name).astype(np.float32), g[f"sched_{name}"].astype(np.float32))


@pytest.mark.parametrize("backend", GOLDEN_BACKENDS)
@pytest.mark.parametrize("case", sorted(FINAL_TOL))
def test_sampler_reproduces_the_reference_loop(tiny_engines, golden, parity, case, backend):
    g = golden(case)
    engines = engines_on(tiny_engines, backend)
    feeds = {"context": g["context"], "cond": g["cond"], "w": g["csft_w"]}
    seen_t = []

    def eps(x, t):
        seen_t.append(t.copy())
        return engines.run("unet", {"x": x, "t": t, **feeds})[0]

    final = sample(eps, g["x_T"], Schedule.create(int(g["steps"])), lambda i: g["noise"][i])
    np.testing.assert_array_equal(np.stack(seen_t), g["step_t"])
    parity(f"sampler {backend} {case} final_latent_from_cond", final, g["final_latent_from_cond"], FINAL_TOL[case])


def test_one_step_matches_the_recorded_step(golden):
    """Driven by the reference's own eps, one step reproduces its pred_x0 and x_out to float32 rounding."""
    g = golden("sampler")
    schedule = Schedule.create(5)
    x = g["x_T"]
    for i, n in enumerate(range(4, -1, -1)):
        x_next, x0 = step(schedule, n, x, g["step_eps"][i], g["noise"][i])
        np.testing.assert_allclose(x0, g["step_pred_x0"][i], rtol=0, atol=2e-5)
        np.testing.assert_allclose(x_next, g["step_x_out"][i], rtol=0, atol=2e-5)
        x = g["step_x_out"][i]


def test_the_step_callback_sees_each_steps_input_timestep_and_x0(golden):
    """Driven by the reference's recorded eps, the callback gets, per step: its number, the model's timestep,
    the x_t the step started from and the reference's pred_x0 — as read-only views (no copy)."""
    g = golden("sampler")
    eps_of = iter(g["step_eps"])
    seen: list[SamplerStep] = []

    def keep(s: SamplerStep) -> None:
        with pytest.raises(ValueError, match="read-only"):
            s.denoised[...] = 0  # the sampler's own arrays cannot be changed from a callback
        seen.append(SamplerStep(s.step, s.steps, s.timestep, np.array(s.x), np.array(s.denoised)))

    final = sample(lambda x, t: next(eps_of), g["x_T"], Schedule.create(5), lambda i: g["noise"][i], keep)
    assert [(s.step, s.steps) for s in seen] == [(i, 5) for i in range(1, 6)]
    assert [s.timestep for s in seen] == list(g["step_t"].reshape(5, -1)[:, 0])
    np.testing.assert_array_equal(seen[0].x, g["x_T"])
    for i, s in enumerate(seen):
        np.testing.assert_allclose(s.denoised, g["step_pred_x0"][i], rtol=0, atol=2e-5)
        if i:
            np.testing.assert_allclose(s.x, g["step_x_out"][i - 1], rtol=0, atol=2e-5)
    np.testing.assert_allclose(final, g["step_x_out"][-1], rtol=0, atol=2e-5)


def test_noise_protocol_is_seeded_pcg64_float32():
    source = NoiseSource(7, (1, 4, 8, 8))
    rng = np.random.Generator(np.random.PCG64(7))
    for _ in range(3):
        expected = rng.standard_normal((1, 4, 8, 8), dtype=np.float32)
        np.testing.assert_array_equal(source.draw(), expected)


@pytest.mark.parametrize("steps", [1, 1001])
def test_step_count_out_of_range(steps):
    with pytest.raises(ValueError, match="steps must be between 2 and 1000"):
        spaced_timesteps(steps)
