"""Every random stream of ddpm_jax, named in one place; each is a pure function of the config's seed (and step).

Nothing carries RNG state: a stream is rebuilt from the seed whenever it is needed, so a resumed run, another device
count or another host draws exactly the same numbers.

    stream                      key                                       used by
    parameter init              PRNGKey(seed)                             train_state.init_train_state
    train step s                fold_in(PRNGKey(seed), s)                 train.train_step, split by fold_in into:
      per-example draws           fold_in(step, EXAMPLES), then the global example index: noise, timestep, flip
      dropout                     fold_in(step, DROPOUT), then the device index
      label dropout               fold_in(step, LABEL_DROPOUT), then the global example index
    training sample grids       PRNGKey(seed + 1)                         the same noise at every grid
    --mode=sample               PRNGKey(seed + 2)
    FID samples                 PRNGKey(seed + 3)                         the same noise at every evaluation
    bits/dim noise              PRNGKey(seed + 3)                         folded with the example index and t
    --mode=inpaint / edit       PRNGKey(inpaint.seed) / PRNGKey(edit.seed)
"""

from __future__ import annotations

import jax

EXAMPLES, DROPOUT, LABEL_DROPOUT = 0, 1, 2  # The streams folded out of a train step's key.


def init_key(seed: int) -> jax.Array:
    """Initial parameters."""
    return jax.random.PRNGKey(seed)


def train_step_key(seed: int, step: jax.Array) -> jax.Array:
    """The key of train step `step`; its streams are folded out of it with EXAMPLES, DROPOUT and LABEL_DROPOUT."""
    return jax.random.fold_in(jax.random.PRNGKey(seed), step)


def training_grid_key(seed: int) -> jax.Array:
    """The sample grids written during training."""
    return jax.random.PRNGKey(seed + 1)


def sample_mode_key(seed: int) -> jax.Array:
    """`--mode=sample`."""
    return jax.random.PRNGKey(seed + 2)


def fid_samples_key(seed: int) -> jax.Array:
    """The samples scored by FID and KID."""
    return jax.random.PRNGKey(seed + 3)


def bound_noise_key(seed: int) -> jax.Array:
    """The forward noise of the variational bound (`--mode=eval`), folded with each example's index."""
    return jax.random.PRNGKey(seed + 3)


def editing_key(seed: int) -> jax.Array:
    """`--mode=inpaint` and `--mode=edit`, from inpaint.seed or edit.seed."""
    return jax.random.PRNGKey(seed)
