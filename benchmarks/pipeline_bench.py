"""Input pipeline throughput: decoding a dataset once, then the steady-state batches a train step consumes.

With --preset (run by `benchmarks/run.py` in its own process) it prints one JSON object: `decode_img_s` is the
one-off cost of loading (JPEG decode, resize, crop) that happens before training; `batches_img_s` is what
`data.train_batches` (shuffled gathers in its prefetch threads) delivers per second, which has to stay well above the
train throughput.

With --sizes 32,64,128 it compares the two paths at each size, on any dataset (e.g. Fashion-MNIST's 60,000 IDX
images): decoding into memory, preparing the ArrayRecord cache (`prepare_img_s`), and shuffled batches from memory
against batches streamed from the cache (`memory_batches_img_s`, `cache_batches_img_s`, the cache with
data.num_workers threads), one JSON line per size and a Markdown table at the end. `--cold` drops the page cache
before the streamed batches (root only), so that they come from the disk.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import ml_collections

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import presets  # noqa: E402
from ddpm_jax import data  # noqa: E402
from ddpm_jax.data import cache  # noqa: E402

DEFAULT_FOLDER = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..", "shared", "data",
                              "butterflies")


def batches_per_second(source: data.ImageSource, batch_size: int, num_batches: int, workers: int = 1) -> float:
    """Images/s of shuffled training batches drawn from `source`, every byte touched as the device copy does."""
    batches = data.train_batches(source, batch_size=batch_size, seed=0, start_step=0, workers=workers)
    next(batches)  # Starts the prefetch threads.
    start = time.perf_counter()
    for _ in range(num_batches):
        next(batches)["image"].sum(axis=0, dtype="uint32")
    seconds = time.perf_counter() - start
    batches.close()
    return num_batches * batch_size / seconds


def compare_paths(folder: str, image_size: int, batch_size: int, num_batches: int, workers: int, cache_root: str,
                  cold: bool) -> dict[str, float]:
    """In memory against the prepared cache at one size: decode, prepare and batch throughputs (images/s)."""
    start = time.perf_counter()
    memory = data.create_source(folder, image_size)
    decode_s = time.perf_counter() - start
    memory_batches = batches_per_second(memory, batch_size, num_batches)
    del memory
    config = ml_collections.ConfigDict({"data": {"dataset": folder, "split": "train", "image_size": image_size,
                                                 "tfds_data_dir": "", "cache_dir": cache_root}})
    start = time.perf_counter()
    path, manifest, _ = data.prepare_from_config(config)
    prepare_s = time.perf_counter() - start
    if cold:
        subprocess.run(["sync"], check=True)
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
    source = cache.open_source(path, manifest)
    cache_batches = batches_per_second(source, batch_size, num_batches, workers)
    return {"image_size": image_size, "images": manifest["count"], "decode_img_s": manifest["count"] / decode_s,
            "prepare_img_s": manifest["count"] / prepare_s, "memory_batches_img_s": memory_batches,
            "cache_batches_img_s": cache_batches, "cache_gib": sum(s["bytes"] for s in manifest["shards"]) / 2**30}


def main() -> None:
    """Times loading `--data` and drawing `--batches` training batches from it, for a preset or in both paths."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--preset", choices=sorted(presets.PRESETS))
    parser.add_argument("--sizes", help="compare memory and cache at these sizes, e.g. 32,64,128")
    parser.add_argument("--data", default=os.environ.get("DDPM_JAX_BUTTERFLIES", DEFAULT_FOLDER),
                        help="a folder of images or of IDX files (default: ../shared/data/butterflies)")
    parser.add_argument("--batches", type=int, default=2000)
    parser.add_argument("--batch_size", type=int, default=64, help="with --sizes")
    parser.add_argument("--workers", type=int, default=2, help="with --sizes: threads gathering from the cache")
    parser.add_argument("--cache_dir", default="", help="with --sizes: where the caches go (default: a temp dir)")
    parser.add_argument("--cold", action="store_true", help="with --sizes: drop the page cache first (root)")
    args = parser.parse_args()
    if not os.path.isdir(args.data):
        raise SystemExit(f"error: no image folder at {args.data}; pass --data=FOLDER (any folder of images)")
    if args.sizes:
        rows = []
        with tempfile.TemporaryDirectory(prefix="pipeline_bench_", dir=args.cache_dir or None) as root:
            for size in (int(s) for s in args.sizes.split(",")):
                rows.append(compare_paths(args.data, size, args.batch_size, args.batches, args.workers, root,
                                          args.cold))
                print(json.dumps(rows[-1]), flush=True)
                shutil.rmtree(root)
                os.makedirs(root)
        print(markdown_table(rows, args.workers))
        return
    if not args.preset:
        raise SystemExit("error: pass --preset=NAME or --sizes=32,64,128")
    p = presets.get(args.preset)
    start = time.perf_counter()
    source = data.create_source(args.data, p.image_size)
    decode_s = time.perf_counter() - start
    batches_img_s = batches_per_second(source, p.batch_size, args.batches)
    print(json.dumps({"decode_img_s": len(source) / decode_s, "batches_img_s": batches_img_s,
                      "images": len(source)}))


def markdown_table(rows: list[dict[str, float]], workers: int) -> str:
    """The README's table: one row per size."""
    lines = ["| size | images | cache GiB | decode to memory img/s | prepare cache img/s | batches from memory img/s "
             f"| batches from cache img/s ({workers} threads) | cache / memory |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['image_size']} | {r['images']:,} | {r['cache_gib']:.2f} | {r['decode_img_s']:,.0f} | "
                     f"{r['prepare_img_s']:,.0f} | {r['memory_batches_img_s']:,.0f} | {r['cache_batches_img_s']:,.0f} "
                     f"| {r['cache_batches_img_s'] / r['memory_batches_img_s']:.2f}x |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
