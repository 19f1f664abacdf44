"""Settings: YAML files, validation and image-size parsing."""

from __future__ import annotations

import pytest
import yaml

from ssimae.config import Config, config_from_dict, load_config, parse_image_size, save_config
from ssimae.errors import SettingError, SsimaeError


def _yaml(tmp_path, text: str, name: str = "settings.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_yaml_keys_with_dashes_or_underscores(tmp_path):
    config = load_config(_yaml(tmp_path, "latent-dim: 16\npatch_size: 256\nthreshold-fpr: 0.01\nflip: false\n"))
    assert (config.latent_dim, config.patch_size, config.threshold_fpr, config.flip) == (16, 256, 0.01, False)
    assert config.method == Config().method  # untouched keys keep their defaults


def test_yaml_values_are_converted_to_the_setting_types(tmp_path):
    # PyYAML reads 1e-3 (no dot) as a string and 256 as an int; both must become the field's type.
    config = load_config(_yaml(tmp_path, "lr: 1e-3\nimage-size: 256\nmax-steps: null\nepochs: 3.0\nrotate: 90\n"))
    assert config.lr == 0.001 and isinstance(config.lr, float)
    assert config.image_size == "256" and config.epochs == 3 and config.max_steps is None and config.rotate == "90"
    config.validate()


@pytest.mark.parametrize("text, key", [("latent-dim: many\n", "latent_dim"), ("lr: fast\n", "lr"),
                                       ("flip: maybe\n", "flip"), ("stride: 10.5\n", "stride"),
                                       ("batch-size: true\n", "batch_size")])
def test_yaml_values_of_the_wrong_type_are_errors_naming_file_and_key(tmp_path, text, key):
    path = _yaml(tmp_path, text, "typed.yaml")
    with pytest.raises(SsimaeError) as info:
        load_config(path)
    assert str(path) in str(info.value) and key in str(info.value)


def test_unknown_key_names_file_and_key(tmp_path):
    path = _yaml(tmp_path, "latent-dim: 16\nlearning-rate: 0.1\n", "mine.yaml")
    with pytest.raises(SsimaeError) as info:
        load_config(path)
    message = str(info.value)
    assert str(path) in message and "learning_rate" in message and "lr" in message  # the known keys are listed


@pytest.mark.parametrize(
    "text, pattern",
    [("latent-dim: [1, 2\n", "not valid YAML"), ("- a\n- b\n", "key: value"), ("just a string\n", "key: value")],
)
def test_malformed_yaml_is_an_error_naming_the_file(tmp_path, text, pattern):
    path = _yaml(tmp_path, text, "broken.yaml")
    with pytest.raises(SsimaeError, match=pattern) as info:
        load_config(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_missing_and_empty_config_files(tmp_path):
    with pytest.raises(SsimaeError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    assert load_config(_yaml(tmp_path, "")) == Config()


@pytest.mark.parametrize("text, line", [("latent-dim: 16\nstride: 8\nlatent-dim: 32\n", 3),
                                        ("latent_dim: 16\nlatent-dim: 32\n", 2)])
def test_a_setting_given_twice_is_an_error_naming_file_line_and_setting(tmp_path, text, line):
    path = _yaml(tmp_path, text, "twice.yaml")
    with pytest.raises(SsimaeError, match=f"config file {path}, line {line}: setting 'latent.dim' is given twice"):
        load_config(path)


def test_yaml_on_top_of_a_base_config(tmp_path):
    base = Config(latent_dim=7, stride=16)
    config = load_config(_yaml(tmp_path, "stride: 20\n"), base)
    assert (config.latent_dim, config.stride) == (7, 20)
    assert base.stride == 16  # the base is not modified


def test_save_and_load_round_trip(tmp_path):
    config = Config(method="l2-ae", latent_dim=12, image_size="320x240", max_steps=5, lr=1e-3, flip=False)
    save_config(config, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == config
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["method"] == "l2-ae"
    assert not list(tmp_path.glob("*.tmp"))


def test_defaults_validate_and_follow_the_paper():
    config = Config().validate()
    assert (config.latent_dim, config.patch_size, config.ssim_window, config.ssim_sigma) == (100, 128, 11, 1.5)
    assert (config.lr, config.weight_decay, config.batch_size, config.stride) == (2e-4, 1e-5, 128, 30)


@pytest.mark.parametrize(
    "changes, pattern",
    [
        ({"method": "gan"}, "method 'gan' is not one of ssim-ae"),
        ({"color": "cmyk"}, "color 'cmyk'"),
        ({"patch_size": 64}, "patch size 64"),
        ({"rotate": "45"}, "rotate '45'"),
        ({"stride": 129}, "stride 129"),
        ({"stride": 0}, "stride 0"),
        ({"latent_dim": 0}, "latent_dim"),
        ({"batch_size": -1}, "batch_size"),
        ({"patches_per_epoch": 0}, "patches_per_epoch"),
        ({"epochs": 0}, "epochs"),
        ({"infer_batch_size": 0}, "infer_batch_size"),
        ({"val_fraction": 1.0}, "val_fraction"),
        ({"val_fraction": -0.1}, "val_fraction"),
        ({"threshold_fpr": 0.0}, "threshold_fpr"),
        ({"threshold_fpr": 1.5}, "threshold_fpr"),
        ({"ssim_window": 10}, "ssim_window 10"),
        ({"ssim_window": 1}, "ssim_window 1"),
        ({"image_size": "big"}, "image size 'big'"),
        ({"lr": 0.0}, "lr"),
        ({"lr": -1e-3}, "lr"),
        ({"lr": float("nan")}, "lr"),
        ({"weight_decay": -1.0}, "weight_decay"),
        ({"max_steps": 0}, "max_steps"),
        ({"max_minutes": 0.0}, "max_minutes"),
        ({"min_defect_area": -5}, "min_defect_area"),
        ({"ssim_sigma": 0.0}, "ssim_sigma"),
        ({"ssim_window": 65}, "ssim_window 65 must be at most half the patch size"),
        ({"precision": "fp16"}, "precision 'fp16' is not one of auto, fp32, tf32, bf16"),
        ({"patchcore_neighbourhood": 2}, "patchcore_neighbourhood 2 must be odd"),
        ({"seed": -1}, "seed must be >= 0"),
        ({"seed": 2**64}, "seed must be below 2"),
        ({"image_size": "100000"}, "more than max_image_pixels"),
        ({"image_size": "40000x40000"}, "more than max_image_pixels"),
    ],
)
def test_validate_errors_carry_the_bad_value(changes, pattern):
    config = config_from_dict(changes)
    with pytest.raises(SettingError, match=pattern) as info:
        config.validate()
    assert info.value.setting == next(iter(changes))  # the CLI names the flag of this setting


def test_stride_equal_to_patch_size_is_allowed():
    Config(stride=128).validate()
    Config(patch_size=256, stride=256).validate()
    with pytest.raises(SsimaeError, match="stride 200 .*patch size 128"):
        Config(stride=200).validate()


def test_config_from_dict_unknown_key_names_the_source():
    with pytest.raises(SsimaeError, match="command line: unknown setting.*colour"):
        config_from_dict({"colour": "rgb"}, source="command line")


@pytest.mark.parametrize(
    "text, expected",
    [
        ("256", 256),
        (256, 256),
        ("320x240", (320, 240)),
        ("320X240", (320, 240)),
        ("32x48", (32, 48)),
        (None, None),
        ("", None),
        ("none", None),
        ("keep", None),
    ],
)
def test_parse_image_size(text, expected):
    assert parse_image_size(text) == expected


@pytest.mark.parametrize("text", ["0", "-5", "abc", "320x", "x240", "1x2x3", "0x10", "10x-1", "256.5", "320*240"])
def test_parse_image_size_errors(text):
    with pytest.raises(SsimaeError, match="image size") as info:
        parse_image_size(text)
    assert repr(text) in str(info.value)


@pytest.mark.parametrize("text", ["1", "31", "1x1", "16x64", "64x31"])
def test_image_sizes_under_32_pixels_a_side_are_refused(text):
    with pytest.raises(SsimaeError, match=f"image size '{text}' is too small: use at least 32 pixels"):
        parse_image_size(text)


@pytest.mark.parametrize("name", ["meta", "mps", "xpu", "gpu"])
def test_devices_other_than_cpu_and_cuda_are_setting_errors(name):
    from ssimae.devices import resolve_device

    with pytest.raises(SettingError, match="auto, cpu, cuda or cuda:N") as info:
        resolve_device(name)
    assert info.value.setting == "device"
