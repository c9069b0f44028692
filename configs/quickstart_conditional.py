"""The quickstart, class-conditional: Fashion-MNIST's 10 labels, label dropout 0.1, classifier-free guidance.

python -m ddpm_jax.main --config=configs/quickstart_conditional.py --workdir=/tmp/qs_cond
python -m ddpm_jax.main --config=configs/quickstart_conditional.py --workdir=/tmp/qs_cond --mode=sample \
    --config.sampling.guidance_scale=3
"""

import pathlib
import sys

import ml_collections

# Lets `configs` import when --config is given as a path from any working directory.
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from configs import quickstart  # noqa: E402


def get_config() -> ml_collections.ConfigDict:
    """Returns the class-conditional quickstart config."""
    config = quickstart.get_config()
    config.model.num_classes = 10
    # The IDX label files hold the numbers 0-9; these are their names in Fashion-MNIST's documentation.
    config.data.class_names = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                               "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
    config.training.label_dropout = 0.1
    config.sampling.num_samples = 80  # A per-class grid: 10 rows of 8.
    config.sampling.guidance_scale = 0.0
    return config
