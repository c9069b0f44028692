"""Sample quality measured offline: a small classifier of the real data scores generated samples.

    python benchmarks/quality.py steps --config=configs/quickstart.py --workdir=DIR [--num_samples=1000]
    python benchmarks/quality.py budget --config=configs/quickstart.py --workdir=none=DIR1 --workdir=min_snr=DIR2
    python benchmarks/quality.py plot --results=quality_steps.json --out=docs/quality_steps.png
    python benchmarks/quality.py table --results=quality_steps.json      # the README's Markdown table

A CNN is trained once on the real training split of the config's dataset (default: Debian's Fashion-MNIST) at the
model's resolution, and cached under ~/.cache/ddpm_jax/quality. A set of uint8 images is then scored by
  fd        the Frechet distance of its penultimate features (128-d) to those of the real test split (lower is better)
  top_prob  the mean probability of the most likely class (confident, recognisable images score high)
  classes   how many classes are the most likely one for at least 1% of the images (coverage of the data's modes)
Every report also scores, with the same number of images, the real training split (the floor: what a perfect model
would score) and Gaussian noise (the ceiling), so the numbers mean something.

  steps   one trained checkpoint (the latest in --workdir), every sampler at 5/10/20/50/100 steps and DDPM at T:
          score, network evaluations and sampling seconds.
  budget  every checkpoint of each --workdir=LABEL=DIR (e.g. the same config trained with loss_weighting none and
          min_snr; --checkpoints=S1,S2 for only those steps), sampled with one sampler (--method, --num_steps,
          --spacing, --order, --eta): score per training step.
  plot    the steps report as a picture: FD against network evaluations, one line per sampler.
  table   a steps or budget report as a Markdown table.
Results go to --out as JSON (and the console as a table).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import pathlib
import sys
import time

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from ddpm_jax import xla_flags  # noqa: E402

xla_flags.apply_defaults()

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from benchmarks import run  # noqa: E402
from ddpm_jax import checkpointing, data, parallel, pixels, rng, sampler, train_state  # noqa: E402
from ddpm_jax.config import load_config_file  # noqa: E402
from ddpm_jax.evaluation import fid  # noqa: E402
from ddpm_jax.models import unet  # noqa: E402

CACHE = pathlib.Path(os.path.expanduser("~/.cache/ddpm_jax/quality"))
CLASSIFIER_VERSION = 1  # Bump when the network or its training changes: cached weights are then retrained.
# (method, spacing, solver order) of the steps report; every method at its own best-known spacing, DDIM at both.
SAMPLERS = [("ddim", "linspace", 2), ("ddim", "trailing", 2), ("heun", "karras", 2), ("dpm_solver++", "trailing", 2),
            ("dpm_solver++", "karras", 2), ("dpm_solver++", "trailing", 3), ("unipc", "trailing", 2),
            ("unipc", "karras", 2)]
STEP_COUNTS = (5, 10, 20, 50, 100)


class Classifier(nn.Module):
    """A small CNN over uint8 images: two conv blocks, a 128-d penultimate layer (the features), K logits."""

    num_classes: int

    @nn.compact
    def __call__(self, images: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
        """(features (B, 128), logits (B, K)) of uint8 images (B, S, S, 3)."""
        x = pixels.to_model_range(images)
        for width in (32, 64):
            x = nn.relu(nn.Conv(width, (3, 3))(x))
            x = nn.relu(nn.Conv(width, (3, 3))(x))
            x = nn.avg_pool(x, (2, 2), (2, 2))
        features = nn.relu(nn.Dense(128)(x.reshape(x.shape[0], -1)))
        return features, nn.Dense(self.num_classes)(features)


def _batched(fn, images: np.ndarray, batch: int = 1000) -> list[np.ndarray]:
    outs = [fn(images[i : i + batch]) for i in range(0, len(images), batch)]
    return [np.concatenate([o[k] for o in outs]) for k in range(len(outs[0]))]


def train_classifier(train: data.ArraySource, test: data.ArraySource, epochs: int = 6, seed: int = 0):
    """Adam on the cross-entropy, batches of 256; returns (params, test accuracy)."""
    model = Classifier(len(train.class_names))
    params = model.init(jax.random.PRNGKey(seed), train.images[:1])
    tx = optax.adam(1e-3)
    opt = tx.init(params)

    @jax.jit
    def step(params, opt, images, labels):
        def loss(p):
            logits = model.apply(p, images)[1]
            return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

        grads = jax.grad(loss)(params)
        updates, opt = tx.update(grads, opt, params)
        return optax.apply_updates(params, updates), opt

    order = np.random.default_rng(seed)
    for _ in range(epochs):
        perm = order.permutation(len(train))
        for i in range(0, len(perm) - 255, 256):
            idx = perm[i : i + 256]
            params, opt = step(params, opt, train.images[idx], train.labels[idx])
    logits = _batched(jax.jit(lambda x: model.apply(params, x)[1:]), test.images)[0]
    return params, float(np.mean(np.argmax(logits, 1) == test.labels))


class Scorer:
    """The cached classifier of a config's data and the real test split's feature statistics."""

    def __init__(self, config, num_images: int):
        """Loads (or trains and caches) the classifier; computes the reference statistics and the floor/ceiling."""
        self.num_images = num_images
        # In memory whatever caches exist: the classifier trains on whole arrays (.images).
        train, test = (data.create_source(config.data.dataset, config.data.image_size, split=split)
                       for split in ("train", "test"))
        if train.labels is None:
            raise SystemExit(f"error: {config.data.dataset} has no class labels; the quality benchmark needs a "
                             "labelled dataset (the default is Fashion-MNIST from Debian)")
        self.model = Classifier(len(train.class_names))
        key = hashlib.sha256(f"{os.path.realpath(str(config.data.dataset))}|{config.data.image_size}|"
                             f"{CLASSIFIER_VERSION}".encode()).hexdigest()[:12]
        path = CACHE / f"classifier_{key}.npz"
        template = self.model.init(jax.random.PRNGKey(0), train.images[:1])
        if path.is_file():
            with np.load(path) as z:
                leaves = [z[f"p{i}"] for i in range(len(jax.tree.leaves(template)))]
                self.test_accuracy = float(z["test_accuracy"])
            self.params = jax.tree.unflatten(jax.tree.structure(template), leaves)
        else:
            start = time.perf_counter()
            self.params, self.test_accuracy = train_classifier(train, test)
            CACHE.mkdir(parents=True, exist_ok=True)
            np.savez(path, test_accuracy=self.test_accuracy,
                     **{f"p{i}": np.asarray(v) for i, v in enumerate(jax.tree.leaves(self.params))})
            print(f"trained the classifier in {time.perf_counter() - start:.0f} s: test accuracy "
                  f"{self.test_accuracy:.3f} ({path})", flush=True)
        self._apply = jax.jit(lambda x: self.model.apply(self.params, x))
        features, _ = self._features(test.images)
        self.reference = fid.gaussian_stats(features)
        pick = np.random.default_rng(1).choice(len(train), num_images, replace=False)
        noise = np.clip(np.round(np.random.default_rng(2).normal(127.5, 64.0, train.images[:num_images].shape)),
                        0, 255).astype(np.uint8)
        self.floor, self.ceiling = self.score(train.images[pick]), self.score(noise)

    def _features(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        features, logits = _batched(self._apply, images)
        return features, np.asarray(jax.nn.softmax(logits, axis=-1))

    def score(self, images: np.ndarray) -> dict[str, float]:
        """fd, top_prob and classes of uint8 images (N, S, S, 3)."""
        features, probs = self._features(images)
        counts = np.bincount(np.argmax(probs, axis=1), minlength=probs.shape[1])
        return {"fd": fid.frechet_distance(*fid.gaussian_stats(features), *self.reference),
                "top_prob": float(np.mean(np.max(probs, axis=1))),
                "classes": int(np.sum(counts >= 0.01 * len(images)))}


def _machine() -> str:
    return f"{run.cpu_name()} ({os.cpu_count()} cores; {run.cpu_flags()}); jax {jax.__version__} on " \
           f"{jax.devices()[0].platform}"


def _restore(config, workdir: str, step: int | None, mesh):
    """The model and the EMA params at `step` (the latest if None) of workdir."""
    ckpt = checkpointing.Checkpointer(checkpointing.checkpoint_dir(workdir))
    try:
        step = ckpt.latest_step() if step is None else step
        model = unet.create_model(config)
        abstract = train_state.abstract_train_state(config, model, train_state.create_optimizer(config), mesh)
        state, _ = ckpt.restore(step, abstract)
    finally:
        ckpt.close()
    return model, state.ema_params, step


def _sample_and_score(config, model, params, mesh, scorer: Scorer) -> dict:
    """Samples scorer.num_images images with config.sampling, scores them; seconds without the compile."""
    sample_fn = sampler.make_sampler(config, model, mesh)
    chunk = sampler.chunk_size(config.sampling.batch_size, scorer.num_images, mesh.size)
    start = time.perf_counter()
    jax.block_until_ready(sample_fn(params, jax.random.PRNGKey(0), chunk))  # Compiles and warms up, untimed.
    compile_s = time.perf_counter() - start
    start = time.perf_counter()
    images, _ = sampler.generate(sample_fn, params, rng.sample_mode_key(config.seed), scorer.num_images,
                                 config.sampling.batch_size, mesh)
    seconds = time.perf_counter() - start
    return {**scorer.score(images), "seconds": round(seconds, 2), "compile_s": round(compile_s, 2)}


def _evaluations(method: str, num_steps: int, num_timesteps: int) -> int:
    """Network evaluations of a sampler run: one per step, Heun two (one on its step to the clean image)."""
    if method == "ddpm":
        return num_timesteps
    return 2 * num_steps - 1 if method == "heun" else num_steps


def steps_report(config, workdir: str, scorer: Scorer, mesh) -> dict:
    """Every sampler of SAMPLERS at STEP_COUNTS, and DDPM at T, on the latest checkpoint of workdir."""
    model, params, step = _restore(config, workdir, None, mesh)
    rows = []
    s = config.sampling
    s.num_intermediates = 0
    runs = [("ddpm", "linspace", 2, config.diffusion.num_timesteps)]
    runs += [(m, sp, o, n) for m, sp, o in SAMPLERS for n in STEP_COUNTS]
    for method, spacing, order, n in runs:
        s.method, s.timestep_spacing, s.solver_order, s.num_steps, s.eta = method, spacing, order, n, 0.0
        row = {"method": method, "spacing": spacing, "solver_order": order, "num_steps": n,
               "evaluations": _evaluations(method, n, config.diffusion.num_timesteps),
               **_sample_and_score(config, model, params, mesh, scorer)}
        rows.append(row)
        print(f"{method:13s} {spacing:9s} order {order} {n:5d} steps: FD {row['fd']:8.3f}  top prob "
              f"{row['top_prob']:.3f}  classes {row['classes']:2d}  {row['seconds']:7.1f} s", flush=True)
    return {"checkpoint_step": step, "rows": rows}


def budget_report(config, workdirs: list[tuple[str, str]], scorer: Scorer, mesh,
                  only_steps: tuple[int, ...] = ()) -> dict:
    """Each workdir's every checkpoint (or those at only_steps), sampled with config.sampling."""
    runs = {}
    for label, workdir in workdirs:
        ckpt = checkpointing.Checkpointer(checkpointing.checkpoint_dir(workdir))
        steps = [s for s in ckpt.all_steps() if not only_steps or s in only_steps]
        ckpt.close()
        if not steps:
            raise SystemExit(f"error: {workdir} has no checkpoint" + (f" at {only_steps}" if only_steps else ""))
        rows = []
        for step in steps:
            model, params, _ = _restore(config, workdir, step, mesh)
            row = {"train_step": step, **_sample_and_score(config, model, params, mesh, scorer)}
            rows.append(row)
            print(f"{label:10s} step {step:6d}: FD {row['fd']:8.3f}  top prob {row['top_prob']:.3f}  classes "
                  f"{row['classes']:2d}", flush=True)
        runs[label] = {"workdir": workdir, "rows": rows}
    s = config.sampling
    return {"sampler": {"method": s.method, "num_steps": s.num_steps, "timestep_spacing": s.timestep_spacing,
                        "solver_order": s.solver_order, "eta": s.eta}, "runs": runs}


def plot(results: dict, out: str) -> None:
    """FD against network evaluations (log-log), one line per sampler, with the floor and DDPM at T."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = results["report"]["rows"]
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for method, spacing, order in SAMPLERS:
        line = [r for r in rows if (r["method"], r["spacing"], r["solver_order"]) == (method, spacing, order)]
        ax.plot([r["evaluations"] for r in line], [r["fd"] for r in line], marker="o",
                label=_sampler_name(method, spacing, order))
    ddpm = [r for r in rows if r["method"] == "ddpm"]
    if ddpm:
        ax.scatter([ddpm[0]["evaluations"]], [ddpm[0]["fd"]], marker="*", s=120, color="k", label="ddpm (T steps)",
                   zorder=3)
    ax.axhline(results["floor"]["fd"], color="gray", linestyle="--", label="real train images (floor)")
    ax.set(xscale="log", yscale="log", xlabel="network evaluations per sample",
           ylabel="Frechet distance to the test split")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    ax.set_title(f"{results['config']}, checkpoint {results['report']['checkpoint_step']}, "
                 f"{results['num_images']} samples", fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")


def _sampler_name(method: str, spacing: str, order: int) -> str:
    return f"{method}{' 3M' if order == 3 else ''} ({spacing})"


def markdown_table(results: dict) -> str:
    """A steps report as FD (seconds) per sampler and step count; a budget report as FD per training step and run."""
    report = results["report"]
    if results["report_kind"] == "budget":
        labels = list(report["runs"])
        steps = sorted({r["train_step"] for run_ in report["runs"].values() for r in run_["rows"]})
        fd = {(label, r["train_step"]): r["fd"] for label, run_ in report["runs"].items() for r in run_["rows"]}
        lines = ["| training steps | " + " | ".join(labels) + " |", "|---:|" + "---:|" * len(labels)]
        for step in steps:
            cells = [f"{fd[label, step]:.1f}" if (label, step) in fd else "" for label in labels]
            lines.append(f"| {step} | " + " | ".join(cells) + " |")
        return "\n".join(lines)
    rows = report["rows"]
    counts = sorted({r["num_steps"] for r in rows if r["method"] != "ddpm"})
    lines = ["| sampler | " + " | ".join(f"{n} steps" for n in counts) + " |", "|---|" + "---:|" * len(counts)]
    for method, spacing, order in SAMPLERS:
        cells = {r["num_steps"]: f"{r['fd']:.1f} ({r['seconds']:.0f} s)" for r in rows
                 if (r["method"], r["spacing"], r["solver_order"]) == (method, spacing, order)}
        lines.append(f"| {_sampler_name(method, spacing, order)} | " + " | ".join(cells.get(n, "") for n in counts)
                     + " |")
    for r in rows:
        if r["method"] == "ddpm":
            lines.append(f"| ddpm, all {r['num_steps']} steps: {r['fd']:.1f} ({r['seconds']:.0f} s) |"
                         + " |" * (len(counts) - 1))
    return "\n".join(lines)


def main() -> None:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("report", choices=["steps", "budget", "plot", "table"])
    parser.add_argument("--config", default=str(HERE.parent / "configs" / "quickstart.py"))
    parser.add_argument("--workdir", action="append", default=[],
                        help="steps: the trained workdir; budget: LABEL=DIR, once per run")
    parser.add_argument("--num_samples", type=int, default=1000)
    parser.add_argument("--method", default="dpm_solver++", help="budget: the sampler")
    parser.add_argument("--num_steps", type=int, default=20, help="budget: its steps")
    parser.add_argument("--spacing", default="trailing", help="budget: its timestep spacing")
    parser.add_argument("--order", type=int, default=2, help="budget: the solver order (dpm_solver++, unipc)")
    parser.add_argument("--eta", type=float, default=0.0, help="budget: DDIM's eta (1: stochastic)")
    parser.add_argument("--checkpoints", default="", help="budget: only these training steps, comma-separated")
    parser.add_argument("--results", default="", help="plot, table: a report's JSON")
    parser.add_argument("--out", default="", help="where the JSON (or, for plot, the PNG) goes")
    parser.add_argument("--set", action="append", default=[],
                        help="KEY=VALUE config overrides (data.dataset=..., seed=1 for other sampling noise)")
    args = parser.parse_args()
    if args.report in ("plot", "table"):
        if not args.results or not pathlib.Path(args.results).is_file():
            raise SystemExit(f"error: {args.report} needs --results=FILE, a JSON that steps or budget wrote")
        results = json.loads(pathlib.Path(args.results).read_text())
        if args.report == "table":
            print(markdown_table(results))
        else:
            plot(results, args.out or "quality_steps.png")
        return
    if not args.workdir:
        raise SystemExit("error: give --workdir (steps: a trained workdir; budget: LABEL=DIR for each run)")
    config = load_config_file(args.config)
    for item in args.set:  # seed=1 (the samples' noise), data.dataset=...
        key, value = item.split("=", 1)
        node, _, name = key.rpartition(".")
        parent = config[node] if node else config
        parent[name] = type(parent[name])(value)
    mesh = parallel.make_mesh()
    start = time.perf_counter()
    scorer = Scorer(config, args.num_samples)
    print(f"classifier test accuracy {scorer.test_accuracy:.3f}; {args.num_samples} images: floor (real train) "
          f"{scorer.floor}, ceiling (noise) {scorer.ceiling}", flush=True)
    if args.report == "steps":
        report = steps_report(config, args.workdir[0], scorer, mesh)
    else:
        config.sampling.method, config.sampling.num_steps = args.method, args.num_steps
        config.sampling.timestep_spacing, config.sampling.num_intermediates = args.spacing, 0
        config.sampling.solver_order, config.sampling.eta = args.order, args.eta
        only = tuple(int(c) for c in args.checkpoints.split(",") if c)
        report = budget_report(config, [tuple(w.split("=", 1)) for w in args.workdir], scorer, mesh, only)
    results = {"report_kind": args.report, "config": os.path.basename(args.config), "machine": _machine(),
               "num_images": args.num_samples, "classifier_test_accuracy": scorer.test_accuracy,
               "floor": scorer.floor, "ceiling": scorer.ceiling, "report": report,
               "seconds": round(time.perf_counter() - start, 1)}
    out = args.out or f"quality_{args.report}.json"
    pathlib.Path(out).write_text(json.dumps(results, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
