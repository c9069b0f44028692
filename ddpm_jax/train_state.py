"""The train state and its update rule: parameters, EMA parameters and optimizer state, and how a gradient moves them.

`TrainState` owns its optimizer (a static field, like Flax's TrainState) and applies a gradient with
`apply_gradients(grads, ema_decay)`: one optimizer step, then the EMA update, as VDM's train state does. The
optimizer, its learning-rate schedule, initialisation and the abstract state that checkpoints are restored into
live here too.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax

from ddpm_jax import parallel, rng, xla_flags


@flax.struct.dataclass
class TrainState:
    """Everything that changes during training; a pytree of global arrays, saved whole in checkpoints.

    The optimizer `tx` is static (not saved): a checkpoint holds step, params, ema_params and opt_state only.
    """

    step: jnp.ndarray
    params: Any
    ema_params: Any
    opt_state: Any
    tx: optax.GradientTransformation = flax.struct.field(pytree_node=False)

    @classmethod
    def create(cls, params: Any, tx: optax.GradientTransformation) -> TrainState:
        """Step 0, the EMA a copy of the parameters, a fresh optimizer state."""
        return cls(step=jnp.zeros((), jnp.int32), params=params, ema_params=jax.tree.map(jnp.array, params),
                   opt_state=tx.init(params), tx=tx)

    def apply_gradients(self, grads: Any, ema_decay: float) -> TrainState:
        """One optimizer step on `grads`, then the EMA update with warm-up (`ema_decay_at`); the step counts up."""
        updates, opt_state = self.tx.update(grads, self.opt_state, self.params)
        params = optax.apply_updates(self.params, updates)
        decay = ema_decay_at(self.step, ema_decay)
        ema_params = jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, self.ema_params, params)
        return self.replace(step=self.step + 1, params=params, ema_params=ema_params, opt_state=opt_state)


def ema_decay_at(step: jnp.ndarray, decay: float) -> jnp.ndarray:
    """EMA decay with warm-up, min(decay, (1 + step) / (10 + step)): early averages forget the random init fast."""
    return jnp.minimum(decay, (1.0 + step) / (10.0 + step))


def learning_rate_schedule(config: ml_collections.ConfigDict) -> optax.Schedule:
    """Linear warm-up from 0 to the learning rate over optim.warmup_steps, then constant (as in DDPM)."""
    lr, warmup = config.optim.learning_rate, config.optim.warmup_steps

    def schedule(step: jnp.ndarray) -> jnp.ndarray:
        if warmup <= 0:
            return jnp.asarray(lr, jnp.float32)
        return lr * jnp.minimum(1.0, (step + 1) / warmup)

    return schedule


def create_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
    """Global-norm clipping followed by Adam or AdamW on the warm-up schedule."""
    o = config.optim
    lr = learning_rate_schedule(config)
    if o.optimizer == "adam":
        opt = optax.adam(lr, b1=o.b1, b2=o.b2, eps=o.eps)
    elif o.optimizer == "adamw":
        opt = optax.adamw(lr, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay)
    else:
        raise ValueError(f"unknown optim.optimizer {o.optimizer!r}; accepted: adam, adamw")
    if o.grad_clip_norm > 0:
        return optax.chain(optax.clip_by_global_norm(o.grad_clip_norm), opt)
    return opt


def _init_fn(
    config: ml_collections.ConfigDict, model: nn.Module, tx: optax.GradientTransformation
) -> Callable[[jax.Array], TrainState]:
    size = config.data.image_size

    def init(key: jax.Array) -> TrainState:
        x = jnp.zeros((1, size, size, 3), jnp.float32)
        params = model.init({"params": key}, x, jnp.zeros((1,), jnp.int32), train=False)["params"]
        return TrainState.create(params, tx)

    return init


def init_train_state(
    config: ml_collections.ConfigDict, model: nn.Module, tx: optax.GradientTransformation, mesh: jax.sharding.Mesh
) -> TrainState:
    """Initialises parameters, EMA and optimizer state from config.seed, replicated over the mesh."""
    init = jax.jit(_init_fn(config, model, tx), out_shardings=parallel.replicated(mesh))
    key = rng.init_key(config.seed)
    options = xla_flags.state_init_compiler_options(jax.default_backend())
    return init.lower(key).compile(compiler_options=options or None)(key)


def abstract_train_state(
    config: ml_collections.ConfigDict, model: nn.Module, tx: optax.GradientTransformation, mesh: jax.sharding.Mesh
) -> TrainState:
    """Shapes, dtypes and (replicated) shardings of the train state, without computing it: a restore target."""
    shapes = jax.eval_shape(_init_fn(config, model, tx), jax.random.PRNGKey(0))
    sharding = parallel.replicated(mesh)
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding), shapes)


def state_bytes(state: TrainState) -> int:
    """Bytes of all arrays of a (possibly abstract) train state: what one checkpoint holds."""
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state))
