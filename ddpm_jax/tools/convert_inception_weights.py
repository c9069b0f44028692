"""Converts pytorch-fid's FID Inception weights (.pth) into the .npz that `ddpm_jax.inception` loads.

    pip install torch    # needed for this conversion only; ddpm_jax itself never imports torch
    python -m ddpm_jax.tools.convert_inception_weights [--pth=pt_inception-2015-12-05-6726825d.pth] [--out=FILE.npz]

Without --pth the file is downloaded from pytorch-fid's release (torch.hub checks its hash). The key mapping is
`ddpm_jax.inception.torch_to_flax` (table in that module's docstring); the result is checked against the Flax
network's variables, names and shapes, before it is written.
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np
from flax import traverse_util

from ddpm_jax.evaluation import inception


def load_torch_state_dict(pth: str | None) -> dict[str, np.ndarray]:
    """The .pth state dict as numpy arrays: from a local file, or downloaded from FID_WEIGHTS_URL when pth is None."""
    try:
        import torch
    except ImportError:
        sys.exit("error: the conversion reads a PyTorch file and needs torch: pip install torch")
    if pth:
        state = torch.load(os.path.expanduser(pth), map_location="cpu", weights_only=True)
    else:
        state = torch.hub.load_state_dict_from_url(inception.FID_WEIGHTS_URL, map_location="cpu", progress=True,
                                                   check_hash=True, weights_only=True)
    return {name: tensor.detach().cpu().numpy() for name, tensor in state.items()}


def convert(state_dict: dict[str, np.ndarray], out: str) -> str:
    """Maps, checks and writes the weights; returns the path written."""
    arrays = inception.torch_to_flax(state_dict)
    inception.check_arrays(arrays, "converted weights")
    return inception.save_variables(out, traverse_util.unflatten_dict(arrays, sep="/"))


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pth", default=None, help="pytorch-fid's pt_inception-2015-12-05-6726825d.pth "
                                                    f"(default: download {inception.FID_WEIGHTS_URL})")
    parser.add_argument("--out", default=inception.DEFAULT_WEIGHTS, help="the .npz to write (default: %(default)s, "
                                                                         "where eval.inception_weights looks)")
    args = parser.parse_args(argv)
    path = convert(load_torch_state_dict(args.pth), args.out)
    print(f"wrote {path} (sha256 {inception.file_digest(path)}...); "
          f"use it with --config.eval.inception_weights={path}")


if __name__ == "__main__":
    main()
