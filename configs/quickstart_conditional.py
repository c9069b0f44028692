"""The quickstart, class-conditional: Fashion-MNIST's 10 labels, label dropout 0.1, classifier-free guidance.

python -m ddpm_jax.main --config=configs/quickstart_conditional.py --workdir=/tmp/qs_cond
python -m ddpm_jax.main --config=configs/quickstart_conditional.py --workdir=/tmp/qs_cond --mode=sample \
    --config.sampling.guidance_scale=3
"""

import pathlib

import ml_collections

from ddpm_jax.config import load_config_file


def get_config() -> ml_collections.ConfigDict:
    """Returns the class-conditional quickstart config."""
    config = load_config_file(pathlib.Path(__file__).with_name("quickstart.py"))
    config.model.num_classes = 10
    # The IDX label files hold the numbers 0-9; these are their names in Fashion-MNIST's documentation.
    config.data.class_names = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                               "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
    config.training.label_dropout = 0.1
    config.sampling.num_samples = 80  # A per-class grid: 10 rows of 8.
    config.sampling.guidance_scale = 0.0
    return config
