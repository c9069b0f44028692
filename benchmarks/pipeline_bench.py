"""Input pipeline throughput: decoding a folder of images once, then the steady-state batches a train step consumes.

Run by `benchmarks/run.py` in its own process; prints one JSON object. `decode_img_s` is the one-off cost of loading
(JPEG decode, resize, crop) that happens before training; `batches_img_s` is what `data.train_batches`
(shuffled gathers in its prefetch thread) delivers per second, which has to stay well above the train throughput.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import presets  # noqa: E402
from ddpm_jax import data  # noqa: E402

DEFAULT_FOLDER = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..", "shared", "data",
                              "butterflies")


def main() -> None:
    """Times loading `--data` at the preset's size and drawing `--batches` training batches from it."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--preset", required=True, choices=sorted(presets.PRESETS))
    parser.add_argument("--data", default=os.environ.get("DDPM_JAX_BUTTERFLIES", DEFAULT_FOLDER),
                        help="a folder of images (default: ../shared/data/butterflies)")
    parser.add_argument("--batches", type=int, default=2000)
    args = parser.parse_args()
    p = presets.get(args.preset)
    if not os.path.isdir(args.data):
        raise SystemExit(f"error: no image folder at {args.data}; pass --data=FOLDER (any folder of images)")

    start = time.perf_counter()
    source = data.create_source(args.data, p.image_size)
    decode_s = time.perf_counter() - start

    batches = data.train_batches(source, batch_size=p.batch_size, seed=0, start_step=0)
    next(batches)  # Starts the prefetch thread.
    start = time.perf_counter()
    for _ in range(args.batches):
        batch = next(batches)["image"]
        batch.sum(axis=0, dtype="uint32")  # Touch every byte, as the host-to-device copy does.
    batches_s = time.perf_counter() - start
    batches.close()
    print(json.dumps({"decode_img_s": len(source) / decode_s, "batches_img_s": args.batches * p.batch_size / batches_s,
                      "images": len(source)}))


if __name__ == "__main__":
    main()
