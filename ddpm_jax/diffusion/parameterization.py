"""What a network's output means, bound once: the noise schedule, the prediction target and x0 clipping.

Every sampler, loss and bound term takes one `Parameterization` instead of threading (schedule, prediction, clip)
through its arguments. It is a pytree whose arrays are the schedule's tables and whose strings and flags are static,
so it can be closed over or passed through `jax.jit`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp

from ddpm_jax.diffusion import schedule as sch

PREDICTIONS = ("eps", "x0", "v")
DenoiseFn = Callable[[jnp.ndarray, jnp.ndarray], jnp.ndarray]  # (x_t, t (B,)) -> network output


@dataclasses.dataclass(frozen=True)
class Parameterization:
    """A schedule with the network's prediction target (eps, x0 or v) and whether predicted x0 is clipped to [-1, 1]."""

    schedule: sch.Schedule
    prediction: str = "eps"
    clip_denoised: bool = True

    def __post_init__(self) -> None:
        """Rejects an unknown prediction target."""
        if self.prediction not in PREDICTIONS:
            raise ValueError(f"unknown prediction target {self.prediction!r}; accepted: {', '.join(PREDICTIONS)}")

    @property
    def num_timesteps(self) -> int:
        """T, the number of diffusion steps."""
        return self.schedule.num_timesteps

    def x0_and_eps(self, x_t: jnp.ndarray, t: jnp.ndarray, output: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
        """The (x_0, eps) pair a network output implies at (x_t, t), without clipping."""
        s = self.schedule
        if self.prediction == "eps":
            return sch.predict_x0_from_eps(s, x_t, t, output), output
        if self.prediction == "x0":
            return output, sch.predict_eps_from_x0(s, x_t, t, output)
        return sch.predict_x0_from_v(s, x_t, t, output), sch.predict_eps_from_v(s, x_t, t, output)

    def predict(self, denoise_fn: DenoiseFn, x: jnp.ndarray, t: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
        """Runs the network at scalar timestep t; returns (x0, eps), with clipping eps is made consistent with x0."""
        tb = jnp.full((x.shape[0],), t, jnp.int32)
        x0, eps = self.x0_and_eps(x, tb, denoise_fn(x, tb))
        if self.clip_denoised:
            x0 = jnp.clip(x0, -1.0, 1.0)
            eps = sch.predict_eps_from_x0(self.schedule, x, tb, x0)
        return x0, eps

    def target(self, x0: jnp.ndarray, t: jnp.ndarray, noise: jnp.ndarray) -> jnp.ndarray:
        """What the network is trained to output for (x0, t, noise): eps, x0 or v."""
        if self.prediction == "eps":
            return noise
        if self.prediction == "x0":
            return x0
        return sch.predict_v(self.schedule, x0, t, noise)


jax.tree_util.register_dataclass(
    Parameterization, data_fields=["schedule"], meta_fields=["prediction", "clip_denoised"]
)
