"""config_checks.validate: good configs pass; every rule rejects a bad value with one informative line."""

import re

import pytest
from helpers import REPO, tiny_config

from ddpm_jax import config_checks
from ddpm_jax.config import load_config_file
from ddpm_jax.errors import ConfigError, UserError


def test_tiny_config_passes(tiny):
    config_checks.validate(tiny, num_devices=8, process_count=1)
    config_checks.validate(tiny, num_devices=1)


@pytest.mark.parametrize("name", ["default", "quickstart", "quickstart_conditional", "butterflies", "cifar10"])
def test_every_shipped_config_passes(name):
    config_checks.validate(load_config_file(REPO / "configs" / f"{name}.py"), num_devices=8, process_count=2)


def _set(path, value):
    def change(config):
        *parents, key = path.split(".")
        node = config
        for p in parents:
            node = node[p]
        node[key] = value

    return change


def _add_unknown_key(name, value):
    def change(config):
        config.training.unlock()
        config.training[name] = value

    return change


def _both(*changes):
    def change(config):
        for c in changes:
            c(config)

    return change


E = re.escape
CASES = [
    # Geometry of the UNet.
    ("image-not-divisible", _set("data.image_size", 9),
     E("data.image_size=9 is not divisible by 2, the UNet's total downsampling with model.ch_mult=(1, 2)")),
    ("image-not-divisible-4-levels", _both(_set("model.ch_mult", (1, 2, 2, 2)), _set("data.image_size", 12)),
     E("data.image_size=12 is not divisible by 8") + ".*" + E("use a multiple of 8")),
    ("attention-never-reached", _set("model.attn_resolutions", (2,)),
     E("model.attn_resolutions has 2, a resolution this UNet never reaches; accepted: 8, 4")),
    ("num-groups-not-dividing", _set("model.num_groups", 16),
     E("model.num_groups=16 does not divide the channel count 8 (model.ch=8 times model.ch_mult)")),
    ("num-groups-not-dividing-3", _set("model.num_groups", 3),
     r"model\.num_groups=3 does not divide the channel count (8|16)"),
    # Batch over devices and hosts.
    ("batch-not-divisible-by-devices", _set("training.batch_size", 12),
     E("training.batch_size=12 (the global batch) is not divisible by the 8 devices; use a multiple of 8")),
    # Typos in key names.
    ("unknown-key-with-suggestion", _add_unknown_key("batchsize", 3),
     E("unknown config key training.batchsize; did you mean training.batch_size?") + "$"),
    ("unknown-key-without-suggestion", _add_unknown_key("zzzzzz", 3), E("unknown config key training.zzzzzz") + "$"),
    # Sampling.
    ("ddim-steps-above-T", _set("sampling.num_steps", 101),
     E("sampling.num_steps=101 must be between 1 and diffusion.num_timesteps=100")),
    ("ddim-steps-zero", _set("sampling.num_steps", 0), E("sampling.num_steps=0 must be between 1 and")),
    # Zero or negative sizes.
    ("image-size-zero", _set("data.image_size", 0), E("data.image_size=0 must be positive")),
    ("image-size-negative", _set("data.image_size", -8), E("data.image_size=-8 must be positive")),
    ("ch-mult-empty", _set("model.ch_mult", ()), E("model.ch_mult=() needs positive multipliers")),
    ("ch-mult-zero", _set("model.ch_mult", (1, 0)), E("model.ch_mult=(1, 0) needs positive multipliers")),
    ("ch-zero", _set("model.ch", 0), E("model.ch and model.num_res_blocks must be positive")),
    ("num-res-blocks-zero", _set("model.num_res_blocks", 0), E("model.ch and model.num_res_blocks must be positive")),
    ("num-groups-zero", _set("model.num_groups", 0), E("model.num_groups=0 must be positive")),
    ("batch-zero", _set("training.batch_size", 0), E("training.batch_size=0 must be positive")),
    ("batch-negative", _set("training.batch_size", -16), E("training.batch_size=-16 must be positive")),
    ("num-train-steps-zero", _set("training.num_train_steps", 0), E("training.num_train_steps=0 must be positive")),
    ("log-every-zero", _set("training.log_every_steps", 0), E("training.log_every_steps=0 must be positive")),
    ("checkpoint-every-negative", _set("training.checkpoint_every_steps", -1),
     E("training.checkpoint_every_steps=-1 must be positive")),
    ("keep-checkpoints-zero", _set("training.keep_checkpoints", 0), E("training.keep_checkpoints=0 must be positive")),
    ("sample-every-negative", _set("training.sample_every_steps", -1),
     E("training.sample_every_steps=-1 must be >= 0")),
    ("num-samples-zero", _set("sampling.num_samples", 0), E("sampling.num_samples and sampling.batch_size")),
    ("sampling-batch-zero", _set("sampling.batch_size", 0), E("sampling.num_samples and sampling.batch_size")),
    ("num-intermediates-negative", _set("sampling.num_intermediates", -1),
     E("sampling.num_intermediates=-1 must be >= 0")),
    ("timesteps-one", _set("diffusion.num_timesteps", 1), E("diffusion.num_timesteps=1 must be at least 2")),
    # Unknown names, with the accepted ones listed.
    ("unknown-schedule", _set("diffusion.schedule", "cosin"),
     E("unknown diffusion.schedule 'cosin'; accepted: linear, cosine")),
    ("unknown-sampler", _set("sampling.method", "euler"), E("unknown sampling.method 'euler'; accepted: ddpm, ddim")),
    ("unknown-prediction", _set("diffusion.prediction", "noise"),
     E("unknown diffusion.prediction 'noise'; accepted: eps, x0, v")),
    ("unknown-optimizer", _set("optim.optimizer", "sgd"), E("unknown optim.optimizer 'sgd'; accepted: adam, adamw")),
    ("unknown-dtype", _set("model.dtype", "float64"),
     E("model.dtype='float64' is not supported; accepted: float32, bfloat16, float16")),
    # Ranges.
    ("ema-decay-one", _set("training.ema_decay", 1.0), E("training.ema_decay=1.0 must be in [0, 1)")),
    ("ema-decay-above-one", _set("training.ema_decay", 1.5), E("training.ema_decay=1.5 must be in [0, 1)")),
    ("ema-decay-negative", _set("training.ema_decay", -0.1), E("training.ema_decay=-0.1 must be in [0, 1)")),
    ("dropout-one", _set("model.dropout", 1.0), E("model.dropout=1.0 must be in [0, 1)")),
    ("learning-rate-zero", _set("optim.learning_rate", 0.0), E("optim.learning_rate=0.0 must be positive")),
    ("warmup-negative", _set("optim.warmup_steps", -1), E("optim.warmup_steps and optim.grad_clip_norm must be >= 0")),
    ("eta-negative", _set("sampling.eta", -0.5), E("sampling.eta=-0.5 must be >= 0")),
    # Several steps per compiled call: every interval must fall on a call boundary.
    ("steps-per-dispatch-zero", _set("training.steps_per_dispatch", 0),
     E("training.steps_per_dispatch=0 must be a positive integer")),
    ("dispatch-num-train-steps", _both(_set("training.steps_per_dispatch", 2), _set("training.num_train_steps", 7)),
     E("training.num_train_steps=7 must be a multiple of training.steps_per_dispatch=2 (training runs 2 steps per "
       "call)") + "$"),
    ("dispatch-log-every", _set("training.steps_per_dispatch", 3),
     E("training.log_every_steps=2 must be a multiple of training.steps_per_dispatch=3")),
    ("dispatch-checkpoint-every", _set("training.steps_per_dispatch", 2),
     E("training.checkpoint_every_steps=3 must be a multiple of training.steps_per_dispatch=2")),
    ("dispatch-sample-every", _both(_set("training.steps_per_dispatch", 2), _set("training.checkpoint_every_steps", 2),
                                    _set("training.sample_every_steps", 5)),
     E("training.sample_every_steps=5 must be a multiple of training.steps_per_dispatch=2")),
    ("dispatch-fid-every", _both(_set("training.steps_per_dispatch", 2), _set("training.checkpoint_every_steps", 2),
                                 _set("training.fid_every_steps", 5)),
     E("training.fid_every_steps=5 must be a multiple of training.steps_per_dispatch=2")),
]


@pytest.mark.parametrize("change, match", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_rule_rejects_bad_value_with_one_line(change, match):
    config = tiny_config("unused", 8)
    config_checks.validate(config, num_devices=8)  # The unchanged config passes, so the change is what fails.
    change(config)
    with pytest.raises(ConfigError, match=match) as err:
        config_checks.validate(config, num_devices=8, process_count=1)
    assert "\n" not in str(err.value)


def test_batch_not_divisible_by_processes():
    config = tiny_config("unused", 8)
    config.training.batch_size = 24
    config_checks.validate(config, num_devices=8, process_count=1)
    with pytest.raises(ConfigError, match=E("training.batch_size=24 is not divisible by the 16 processes")):
        config_checks.validate(config, num_devices=8, process_count=16)


def test_batch_divisibility_follows_the_device_count():
    config = tiny_config("unused", 8)
    config.training.batch_size = 12
    config_checks.validate(config, num_devices=4)
    with pytest.raises(ConfigError, match="not divisible by the 8 devices"):
        config_checks.validate(config, num_devices=8)


def test_steps_per_dispatch_accepts_multiples_and_intervals_that_are_off():
    config = tiny_config("unused", 8)
    config.training.steps_per_dispatch, config.training.checkpoint_every_steps = 2, 4
    config_checks.validate(config, num_devices=8)  # sample_every_steps and fid_every_steps are 0: off.
    config.training.sample_every_steps = 6
    config_checks.validate(config, num_devices=8)


def test_config_error_is_a_user_error_and_a_value_error():
    assert issubclass(ConfigError, UserError) and issubclass(ConfigError, ValueError)


@pytest.mark.parametrize("key,value,message", [
    ("inpaint.jump_length", 0, "inpaint.jump_length=0 must be a positive integer"),
    ("inpaint.resample_count", -1, "inpaint.resample_count=-1 must be a positive integer"),
    ("inpaint.mask", " ", "inpaint.mask is empty"),
    ("edit.strength", 1.5, r"edit.strength=1.5 must be in \[0, 1\]"),
    ("edit.noise_sigma", -0.1, "edit.noise_sigma=-0.1 must be >= 0"),
    ("edit.num_images", 0, "edit.num_images=0 must be a positive integer"),
    ("eval.variance", "learned", "accepted: fixed_small, fixed_large"),
    ("eval.num_examples", -1, "0: the whole split"),
    ("eval.batch_size", 0, "eval.batch_size=0 must be positive"),
    ("eval.split", "", "must name a split"),
    ("eval.fid_num_samples", 1, "eval.fid_num_samples=1 must be at least 2"),
])
def test_editing_and_evaluation_keys(key, value, message):
    config = tiny_config("", 8)
    section, name = key.split(".")
    config[section][name] = value
    with pytest.raises(ConfigError, match=message):
        config_checks.validate(config, num_devices=1)


@pytest.mark.parametrize("key,value,message", [
    ("sampling.class_label", 3, "class in [0, 2]"),
    ("training.label_dropout", 1.0, "must be in [0, 1)"),
    ("data.class_names", ("a", "b"), "has 2 names but model.num_classes=3"),
])
def test_class_conditioning_keys(key, value, message):
    config = tiny_config()
    config.model.num_classes = 3
    config_checks.validate(config, num_devices=1)
    section, name = key.split(".")
    config[section][name] = value
    with pytest.raises(ConfigError, match=re.escape(message)):
        config_checks.validate(config, num_devices=1)


def test_guidance_needs_a_conditional_model():
    config = tiny_config()
    config.sampling.guidance_scale = 2.0
    with pytest.raises(ConfigError, match="needs a class-conditional model"):
        config_checks.validate(config, num_devices=1)


@pytest.mark.parametrize("key,value,message", [
    ("sampling.timestep_spacing", "uniform", "unknown sampling.timestep_spacing 'uniform'; accepted: linspace, "
                                             "leading, trailing, karras"),
    ("sampling.solver_order", 4, "sampling.solver_order=4 must be 1 to 3 for sampling.method=dpm_solver++"),
    ("training.loss_weighting", "snr", "unknown training.loss_weighting 'snr'; accepted: none, min_snr, p2"),
    ("training.min_snr_gamma", 0.0, "training.min_snr_gamma=0.0 and training.p2_gamma=1.0 must be positive"),
])
def test_sampler_and_loss_weighting_keys(key, value, message):
    config = tiny_config("", 8)
    config.sampling.method = "dpm_solver++"
    config_checks.validate(config, num_devices=1)
    section, name = key.split(".")
    config[section][name] = value
    with pytest.raises(ConfigError, match=re.escape(message)):
        config_checks.validate(config, num_devices=1)


def test_unipc_goes_to_order_two():
    config = tiny_config("", 8)
    config.sampling.method, config.sampling.solver_order = "unipc", 3
    with pytest.raises(ConfigError, match=E("sampling.solver_order=3 must be 1 to 2 for sampling.method=unipc")):
        config_checks.validate(config, num_devices=1)


def test_a_wrong_kernel_gradient_override_is_refused_before_compiling(tiny, monkeypatch):
    monkeypatch.setenv("DDPM_JAX_KERNEL_GRADIENT", "fast")
    with pytest.raises(ConfigError, match=r"^DDPM_JAX_KERNEL_GRADIENT='fast' is not one of auto, autodiff, swapped"):
        config_checks.validate(tiny, num_devices=1)
    monkeypatch.setenv("DDPM_JAX_KERNEL_GRADIENT", "autodiff")
    config_checks.validate(tiny, num_devices=1)
