"""Writes tests/data/pytorch_fid_random_weights.npz: pytorch-fid's own pool3 features of two butterfly photos under
the seeded random weights of inception_fixture.random_torch_state, for test_inception.py to compare against.

Needs torch, torchvision and pytorch-fid (not ddpm_jax dependencies); run once, from the repository root:
    python tests/make_pytorch_fid_fixture.py ../shared/data/butterflies
pytorch-fid's weight download is replaced by the random state dict, so this runs offline.
"""

from __future__ import annotations

import pathlib
import sys

import numpy as np
import torch
from PIL import Image
from pytorch_fid import inception as pytorch_fid_inception

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from inception_fixture import FIXTURE, FIXTURE_SIZE, random_torch_state  # noqa: E402


def main(butterflies: str) -> None:
    """Runs pytorch-fid's InceptionV3 (its FID blocks, without resizing) on two photos at FIXTURE_SIZE."""
    state = {k: torch.from_numpy(v) for k, v in random_torch_state().items()}
    pytorch_fid_inception.load_state_dict_from_url = lambda *args, **kwargs: state
    model = pytorch_fid_inception.InceptionV3([3], resize_input=False).eval()
    files = sorted(pathlib.Path(butterflies).rglob("*.jpg"))[:2]
    images = np.stack([np.asarray(Image.open(f).convert("RGB").resize((FIXTURE_SIZE, FIXTURE_SIZE), Image.BICUBIC))
                       for f in files])
    with torch.no_grad():  # pytorch-fid's input: uint8 / 255 in NCHW; it scales to [-1, 1] itself.
        features = model(torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0)[0][:, :, 0, 0].numpy()
    out = pathlib.Path(__file__).parent / FIXTURE
    out.parent.mkdir(exist_ok=True)
    np.savez_compressed(out, images=images, features=features, torch_version=torch.__version__)
    print(f"wrote {out}: features {features.shape}, mean {features.mean():.4f}, std {features.std():.4f}")


if __name__ == "__main__":
    main(sys.argv[1])
