"""The default config as the list of keys, config files loaded by path, and the did-you-mean hint."""

import pytest
from helpers import REPO

from ddpm_jax import config
from ddpm_jax.errors import ConfigError


def test_every_key_is_a_dotted_leaf_of_the_default():
    keys = config.flat_keys(config.get_config())
    assert {"seed", "data.dataset", "training.batch_size", "sampling.method", "eval.fid_cache_dir"} <= keys
    assert "training" not in keys and all(k.count(".") <= 1 for k in keys)


def test_config_files_load_by_path_and_build_on_each_other():
    quickstart = config.load_config_file(REPO / "configs" / "quickstart.py")
    conditional = config.load_config_file(REPO / "configs" / "quickstart_conditional.py")
    assert conditional.model.num_classes == 10 and quickstart.model.num_classes == 0
    assert conditional.data.image_size == quickstart.data.image_size == 16  # The rest is the quickstart's.
    assert config.load_config_file(REPO / "configs" / "default.py").to_dict() == config.get_config().to_dict()
    with pytest.raises(ConfigError, match="nope.py does not exist"):
        config.load_config_file(REPO / "configs" / "nope.py")


def test_unknown_key_message_suggests_the_closest_key():
    assert config.unknown_key_message("training.batchsize") == (
        "unknown config key training.batchsize; did you mean training.batch_size?")
    assert config.unknown_key_message("zzz.qqq") == "unknown config key zzz.qqq"


def test_configs_do_not_edit_sys_path():
    for path in (REPO / "configs").glob("*.py"):
        assert "sys.path" not in path.read_text(), path
