"""Spaced DDPM ("fixed small" variance) as small pure functions over numpy arrays.

The schedule is a frozen dataclass of float64 arrays; a step is a function of (x, eps, index, noise); the
model is any callable `eps(x, t)`. Arithmetic follows the reference exactly: coefficients are float64,
looked up per step and cast to float32, and all tensor math is float32.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from .manifest import ScheduleConfig

EpsModel = Callable[[np.ndarray, np.ndarray], np.ndarray]  # (x [B,4,h,w] f32, t [B] i64) -> eps


def base_alphas_cumprod(linear_start: float = 0.00085, linear_end: float = 0.012, timesteps: int = 1000
                        ) -> np.ndarray:
    """SD's "linear" schedule (linear in √β), float64."""
    betas = np.linspace(linear_start**0.5, linear_end**0.5, timesteps, dtype=np.float64) ** 2
    return np.cumprod(1.0 - betas)


def spaced_timesteps(steps: int, timesteps: int = 1000) -> np.ndarray:
    """Timesteps for `steps` sampling steps, ascending: positions grow by (T−1)/(S−1) by repeated float64
    addition and are rounded half to even (Python's round), e.g. 5 → [0, 250, 500, 749, 999]."""
    if not 2 <= steps <= timesteps:
        raise ValueError(f"steps must be between 2 and {timesteps}, not {steps}")
    stride = (timesteps - 1) / (steps - 1)
    position, out = 0.0, []
    for _ in range(steps):
        out.append(round(position))
        position += stride
    return np.array(sorted(set(out)), dtype=np.int64)


@dataclass(frozen=True)
class Schedule:
    """Respaced coefficients, one per spaced index n (float64), and the original timestep ids."""

    timesteps: np.ndarray
    betas: np.ndarray
    alphas_cumprod: np.ndarray
    alphas_cumprod_prev: np.ndarray
    sqrt_recip_alphas_cumprod: np.ndarray
    sqrt_recipm1_alphas_cumprod: np.ndarray
    posterior_variance: np.ndarray
    posterior_mean_coef1: np.ndarray
    posterior_mean_coef2: np.ndarray

    @property
    def steps(self) -> int:
        return len(self.timesteps)

    @classmethod
    def create(cls, steps: int, linear_start: float = 0.00085, linear_end: float = 0.012,
               timesteps: int = 1000) -> Schedule:
        base = base_alphas_cumprod(linear_start, linear_end, timesteps)
        ts = spaced_timesteps(steps, timesteps)
        betas, previous = [], 1.0
        for t in ts:
            betas.append(1.0 - base[t] / previous)
            previous = base[t]
        betas = np.array(betas, dtype=np.float64)
        ac = np.cumprod(1.0 - betas)
        ac_prev = np.append(1.0, ac[:-1])
        return cls(
            timesteps=ts,
            betas=betas,
            alphas_cumprod=ac,
            alphas_cumprod_prev=ac_prev,
            sqrt_recip_alphas_cumprod=np.sqrt(1.0 / ac),
            sqrt_recipm1_alphas_cumprod=np.sqrt(1.0 / ac - 1),
            posterior_variance=betas * (1.0 - ac_prev) / (1.0 - ac),
            posterior_mean_coef1=betas * np.sqrt(ac_prev) / (1.0 - ac),
            posterior_mean_coef2=(1.0 - ac_prev) * np.sqrt(1.0 - betas) / (1.0 - ac),
        )

    @classmethod
    def from_manifest(cls, config: ScheduleConfig, steps: int) -> Schedule:
        """The manifest's schedule spaced to `steps`; cached, as every restore asks for the same few."""
        return _spaced(steps, config.linear_start, config.linear_end, config.timesteps)


def check_schedule(linear_start: float, linear_end: float, timesteps: int, max_steps: int) -> None:
    """Raise ValueError unless every spaced schedule of 2..`max_steps` steps is usable: β finite in (0, 1),
    ᾱ strictly decreasing from 1 and positive, every coefficient finite as the float32 the loop uses.

    A spaced schedule's ᾱ are a subset of the base ones that always holds t = 0 and t = T−1, its β lie in
    (0, 1) and its posterior coefficients are bounded by 1 and 1/√ᾱ(T−1); so the 2-step and the
    `max_steps` schedules reach every extreme, and building them checks every step count."""
    if not 2 <= max_steps <= timesteps:
        raise ValueError(f"{timesteps} timesteps leave no room for {max_steps} steps (2 ≤ steps ≤ timesteps)")
    if not 0 < linear_start < linear_end < 1:
        raise ValueError(f"linear_start {linear_start} and linear_end {linear_end}: need 0 < start < end < 1")
    alphas_cumprod = base_alphas_cumprod(linear_start, linear_end, timesteps)
    if not (np.all(np.diff(alphas_cumprod, prepend=1.0) < 0) and alphas_cumprod[-1] > 0):
        raise ValueError("alphas_cumprod is not strictly decreasing from 1 to a positive value (β rounds to 0 or 1)")
    for steps in (2, max_steps):
        with np.errstate(all="ignore"):  # an overflow is the finding, not a warning
            schedule = Schedule.create(steps, linear_start, linear_end, timesteps)
            bad = [name for name, values in vars(schedule).items()
                   if values.dtype == np.float64 and not np.all(np.isfinite(values.astype(np.float32)))]
        if bad:
            raise ValueError(f"{', '.join(bad)} not finite in float32 at {steps} steps")


@lru_cache(maxsize=16)
def _spaced(steps: int, linear_start: float, linear_end: float, timesteps: int) -> Schedule:
    return Schedule.create(steps, linear_start, linear_end, timesteps)


def _f32(value: float) -> np.float32:
    return np.float32(value)


def predict_x0(schedule: Schedule, n: int, x: np.ndarray, eps: np.ndarray) -> np.ndarray:
    """x0 = √(1/ᾱ)·x − √(1/ᾱ−1)·eps, unclipped."""
    return _f32(schedule.sqrt_recip_alphas_cumprod[n]) * x - _f32(schedule.sqrt_recipm1_alphas_cumprod[n]) * eps


def step(schedule: Schedule, n: int, x: np.ndarray, eps: np.ndarray, noise: np.ndarray
         ) -> tuple[np.ndarray, np.ndarray]:
    """One reverse step at spaced index n: returns (x_{n-1}, predicted x0). No noise is added at n = 0."""
    x0 = predict_x0(schedule, n, x, eps)
    mean = _f32(schedule.posterior_mean_coef1[n]) * x0 + _f32(schedule.posterior_mean_coef2[n]) * x
    if n == 0:
        return mean, x0
    return mean + np.sqrt(_f32(schedule.posterior_variance[n])) * noise, x0


class NoiseSource:
    """The RNG protocol: Generator(PCG64(seed)).standard_normal(shape, float32) — first x_T, then one draw
    per step including the last (drawn, unused), always of the full latent shape."""

    def __init__(self, seed: int, shape: tuple[int, ...]):
        self.seed, self.shape = seed, shape
        self._rng = np.random.Generator(np.random.PCG64(seed))

    def draw(self) -> np.ndarray:
        return self._rng.standard_normal(self.shape, dtype=np.float32)


@dataclass(frozen=True)
class SamplerStep:
    """What one reverse step saw and predicted, for a caller's callback (a preview, a progress bar): as
    k-diffusion's samplers hand theirs `x, i, sigma, denoised`. The arrays are read-only views of the
    sampler's own (no copy is made): valid during the call, `np.array(...)` to keep one."""

    step: int  # 1..steps, in sampling order
    steps: int
    timestep: int  # the model's timestep id t_n (999 → 0 over the spaced schedule)
    x: np.ndarray  # x_t, the latent the step started from [B,4,h,w]
    denoised: np.ndarray  # the x0 prediction of this step [B,4,h,w], unclipped


StepCallback = Callable[[SamplerStep], None]


def _read_only(array: np.ndarray) -> np.ndarray:
    view = array.view()
    view.flags.writeable = False
    return view


def sample(eps_model: EpsModel, x_T: np.ndarray, schedule: Schedule, noise: Callable[[int], np.ndarray],
           callback: StepCallback | None = None) -> np.ndarray:
    """The reverse loop from x_T over the schedule, descending; `noise(i)` gives the noise of iteration i;
    `callback` is called after each step (raising from it stops the loop)."""
    x = x_T
    batch = x.shape[0]
    for i, n in enumerate(range(schedule.steps - 1, -1, -1)):
        t = np.full(batch, schedule.timesteps[n], dtype=np.int64)
        eps = eps_model(x, t)
        x_next, x0 = step(schedule, n, x, eps, noise(i))
        if callback is not None:
            callback(SamplerStep(i + 1, schedule.steps, int(schedule.timesteps[n]), _read_only(x),
                                 _read_only(x0)))
        x = x_next
    return x
