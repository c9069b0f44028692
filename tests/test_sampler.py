"""The compiled sampler on the mesh: the UNet runs on each device's share of the batch, chunks, labels, grids."""

import re

import jax
import jax.numpy as jnp
import numpy as np
from helpers import tiny_config

from ddpm_jax import checkpointing, parallel, sampler


def _conv_batches(hlo: str) -> set[int]:
    """The batch sizes of the convolutions in a compiled program (the leading dim of their f32[B,H,W,C] output)."""
    return {int(m) for m in re.findall(r"= f32\[(\d+),\d+,\d+,\d+\]\{[^}]*\} convolution\(", hlo)}


def test_the_network_runs_on_each_devices_share_of_the_batch(trained_run):
    """8 devices and 16 samples: every convolution of the compiled sampler sees 2 images, not 16."""
    workdir, config, _, _ = trained_run
    mesh = parallel.make_mesh()
    model, params, _ = checkpointing.restore_ema_params(config, str(workdir), mesh)
    run = sampler.make_sampler(config, model, mesh)
    hlo = run.lower(params, jax.random.PRNGKey(0), 16).compile().as_text()
    assert _conv_batches(hlo) == {2}, _conv_batches(hlo)


def test_samples_do_not_depend_on_the_device_count(trained_run):
    """--mode=sample splits the CPU into one device per core (xla_flags.cpu_devices_for): the same images on 1, 2, 8."""
    workdir, config, _, _ = trained_run
    samples = []
    for n in (1, 2, 8):
        mesh = parallel.make_mesh(jax.devices()[:n])
        model, params, _ = checkpointing.restore_ema_params(config, str(workdir), mesh)
        samples.append(sampler.generate(sampler.make_sampler(config, model, mesh), params, jax.random.PRNGKey(3), 8,
                                        8, mesh)[0].astype(np.int16))
    for other in samples[1:]:
        # The noise is drawn for the whole batch whatever its sharding; only the kernels' rounding may differ.
        assert np.abs(other - samples[0]).max() <= 1 and np.mean(other != samples[0]) < 0.01


def test_generate_chunks_to_the_device_count_and_draws_fresh_noise_per_chunk(trained_run):
    workdir, config, _, _ = trained_run
    mesh = parallel.make_mesh()
    model, params, _ = checkpointing.restore_ema_params(config, str(workdir), mesh)
    run = sampler.make_sampler(config, model, mesh)
    assert sampler.chunk_size(5, 20, 8) == 8 and sampler.chunk_size(256, 6, 8) == 8
    samples, frames = sampler.generate(run, params, jax.random.PRNGKey(1), 13, 5, mesh)  # Chunks of 8: 8 + 5.
    assert samples.shape == (13, 8, 8, 3) and samples.dtype == np.uint8
    assert frames.shape == (3, 8, 8, 8, 3)  # The first chunk's frames, sampling.num_intermediates of them.
    np.testing.assert_array_equal(frames[-1], samples[:8])  # The last frame is the sample.
    # The first chunk is the sampler called on fold_in(key, 0): chunking adds no noise of its own.
    first, _ = run(params, jax.random.fold_in(jax.random.PRNGKey(1), 0), 8)
    np.testing.assert_array_equal(samples[:8], parallel.fetch(first))
    assert not np.array_equal(samples[:5], samples[8:13])
    # Compiled ahead for the chunk of 8 (as training does for its grids): the same samples, other sizes still work.
    ahead = sampler.precompile(run, params, 8)
    again, _ = sampler.generate(ahead, params, jax.random.PRNGKey(1), 13, 5, mesh)
    np.testing.assert_array_equal(again, samples)
    assert ahead(params, jax.random.PRNGKey(1), 16)[0].shape == (16, 8, 8, 3)


def test_labelled_sampling_and_grid_labels(conditional_run):
    workdir, config = conditional_run
    mesh = parallel.make_mesh()
    model, params, _ = checkpointing.restore_ema_params(config, str(workdir), mesh)
    labels = sampler.grid_labels(config)
    assert labels.tolist() == [0, 0, 1, 1, 2, 2]  # sampling.num_samples = 6 over 3 classes, a row each.
    run = sampler.make_sampler(config, model, mesh)
    samples, _ = sampler.generate(run, params, jax.random.PRNGKey(0), 6, 8, mesh, labels=labels)
    assert samples.shape == (6, 8, 8, 3)
    ahead, _ = sampler.generate(sampler.precompile(run, params, 8, labels), params, jax.random.PRNGKey(0), 6, 8, mesh,
                                labels=labels)
    np.testing.assert_array_equal(ahead, samples)
    # The same noise under other labels gives other images: the labels reach the network.
    other, _ = sampler.generate(run, params, jax.random.PRNGKey(0), 6, 8, mesh, labels=labels[::-1].copy())
    assert not np.array_equal(samples[:2], other[:2])

    config = tiny_config()
    assert sampler.grid_labels(config) is None
    config.model.num_classes, config.sampling.num_samples = 3, 8
    assert sampler.grid_labels(config).tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    config.sampling.class_label = 2
    assert sampler.grid_labels(config).tolist() == [2] * 8


def test_sharded_denoiser_guides_with_the_labels(conditional_run):
    workdir, config = conditional_run
    mesh = parallel.make_mesh()
    model, params, _ = checkpointing.restore_ema_params(config, str(workdir), mesh)
    x = jax.random.normal(jax.random.PRNGKey(0), (8, 8, 8, 3))
    t = jnp.full((8,), 30)
    labels = jnp.arange(8) % 3

    @jax.jit
    def outputs(params):
        cond = sampler.sharded_denoiser(model, params, mesh, labels=labels)(x, t)
        guided = sampler.sharded_denoiser(model, params, mesh, labels=labels, guidance_scale=2.0)(x, t)
        uncond = sampler.sharded_denoiser(model, params, mesh)(x, t)
        return cond, guided, uncond

    cond, guided, uncond = outputs(params)
    np.testing.assert_allclose(guided, 3.0 * cond - 2.0 * uncond, rtol=1e-4, atol=1e-5)


def test_every_method_samples_through_the_compiled_sampler(trained_run):
    """The fast solvers run where every sampler runs: sample grids, --mode=sample and FID all use make_sampler."""
    workdir, config, _, _ = trained_run
    mesh = parallel.make_mesh()
    model, params, _ = checkpointing.restore_ema_params(config, str(workdir), mesh)
    config = config.copy_and_resolve_references()
    config.sampling.num_steps, config.sampling.timestep_spacing = 4, "trailing"
    for method in ("dpm_solver++", "unipc", "heun"):
        config.sampling.method = method
        samples, frames = sampler.generate(sampler.make_sampler(config, model, mesh), params, jax.random.PRNGKey(0),
                                           8, 8, mesh)
        assert samples.shape == (8, 8, 8, 3) and samples.std() > 0, method
        np.testing.assert_array_equal(frames[-1], samples)
