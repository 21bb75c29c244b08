"""The config against the original's keys and values (its ImageNet YAML, configs/vit_patch32_imagenet2012_config.yml, and its code's defaults)."""
from pathlib import Path

import pytest
import yaml

from vitkit.config import (
    FLAT_KEYS,
    OPTIONS,
    Config,
    config_to_dict,
    dump_yaml,
    load_config,
    to_flat,
)
from vitkit.errors import VitkitError

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
TRAIN_8P = CONFIGS / "vit_patch32_imagenet2012_config.yml"
TRAIN_CLOUD = CONFIGS / "vit_patch32_imagenet2012_config_cloud.yml"
TRAIN_STANDALONE = CONFIGS / "vit_patch32_imagenet2012_config_standalone.yml"
EVAL = CONFIGS / "vit_eval.yml"
EXPORT = CONFIGS / "vit_export.yml"

# The original's 8-device keys that have a vitkit field, with their values in the original's flat spelling
# (switches as 0/1). vit_config_path is the one mapped value: the original's 'src.vit.VitConfig' is vitkit's ''.
ORIGINAL_8P_FLAT = {
    "dataset_path": "/opt/npu/datasets/imagenet/train",
    "train_image_size": 224,
    "interpolation": "BILINEAR",
    "crop_min": 0.05,
    "batch_size": 256,
    "train_num_workers": 14,
    "eval_path": "/opt/npu/datasets/imagenet/val",
    "eval_image_size": 224,
    "eval_batch_size": 256,
    "eval_interval": 1,
    "eval_offset": -1,
    "eval_num_workers": 12,
    "backbone": "vit_base_patch32",
    "class_num": 1001,
    "vit_config_path": "",
    "pretrained": "",
    "lr_decay_mode": "cosine",
    "lr_init": 0.0,
    "lr_max": 0.00355,
    "lr_min": 0.0,
    "max_epoch": 300,
    "warmup_epochs": 40,
    "opt": "adamw",
    "beta1": 0.9,
    "beta2": 0.999,
    "weight_decay": 0.05,
    "no_weight_decay_filter": "beta,bias",
    "gc_flag": 0,
    "loss_scale": 1024,
    "use_label_smooth": 1,
    "label_smooth_factor": 0.1,
    "mixup": 0.2,
    "autoaugment": 1,
    "loss_name": "ce_smooth_mixup",
    "save_checkpoint": 1,
    "save_checkpoint_epochs": 8,
    "keep_checkpoint_max": 3,
    "save_checkpoint_path": "./outputs",
    "open_profiler": 0,
    # The export file's keys; their defaults are vitkit's, the export file's values are checked below.
    "file_name": "vit_base_patch32.onnx",
    "file_format": "ONNX",
    "ckpt_file": "",
}


def write(tmp_path, text, name="config.yml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def changed(config):
    """{dotted key: value} of every field that differs from the defaults."""
    defaults = config_to_dict(Config())
    return {
        f"{group}.{name}": value
        for group, values in config_to_dict(config).items()
        for name, value in values.items()
        if defaults[group][name] != value
    }


def error_of(config_path=None, overrides=()):
    with pytest.raises(VitkitError) as caught:
        load_config(config_path, overrides)
    message = str(caught.value)
    assert "\n" not in message
    return message


# ---- the original's files and defaults ---------------------------------------------------------------------


# The ModelArts sync keys: the 8p file's values, and the cloud flow's caches (absent from the 8p file) at the
# paths moxing_adapter uses.
MODELARTS_FLAT = {
    "enable_modelarts": 0,
    "data_url": "",
    "train_url": "",
    "checkpoint_url": "",
    "output_path": "/cache/train",
    "data_path": "/cache/data",
    "load_path": "/cache/checkpoint_path",
}


def test_defaults_are_the_original_8p_values():
    assert to_flat(load_config()) == {**ORIGINAL_8P_FLAT, **MODELARTS_FLAT}


def test_8p_file_is_the_defaults():
    config = load_config(TRAIN_8P)
    assert config == Config()
    assert changed(config) == {}


def test_standalone_changes_lr_max_and_workers_only():
    assert changed(load_config(TRAIN_STANDALONE)) == {"schedule.lr_max": 0.00044375, "data.num_workers": 4}


def test_cloud_reads_data_from_the_cache():
    config = load_config(TRAIN_CLOUD)
    assert changed(config) == {
        "data.train_path": "/cache/datasets/imagenet/train",
        "data.val_path": "/cache/datasets/imagenet/val",
        "storage.enable_modelarts": True,
        "storage.data_url": "s3://bucket-d/datasets/imagenet",
        "storage.train_url": "s3://bucket-d/train",
        "storage.checkpoint_url": "s3://bucket-d/model/vit_base_patch32.ckpt",
        "storage.data_path": "/cache/datasets/imagenet",
        "storage.load_path": "/cache/model/vit_base_patch32.ckpt",
    }
    noted = {note.split(":")[0] for note in config.notes}
    assert not {"enable_modelarts", "data_url", "train_url", "checkpoint_url", "output_path", "data_path",
                "load_path"} & noted


def test_eval_file():
    config = load_config(EVAL)
    assert changed(config) == {"model.pretrained": "../vit_base_patch32.ckpt"}
    assert config.eval.image_size == 224 and config.eval.batch_size == 256 and config.eval.offset == -1


def test_export_file_batch_size_is_the_export_batch():
    config = load_config(EXPORT)
    assert config.export.batch_size == 1
    assert config.data.batch_size == 256
    assert config.model.pretrained == "./vit_base_patch32.ckpt"
    assert config.export.file_format == "ONNX"
    assert config.export.file_name == "vit_base_patch32.onnx"
    assert any(note.startswith("file_format: MINDIR") for note in config.notes)
    assert any("vit_base_patch32.mindir" in note for note in config.notes)
    assert any(note.startswith("device_target:") for note in config.notes)


def test_export_file_makes_command_line_batch_size_the_export_batch():
    config = load_config(EXPORT, ["--batch_size=4"])
    assert (config.export.batch_size, config.data.batch_size) == (4, 256)


def test_command_line_naming_an_export_key_is_an_export_document():
    config = load_config(None, ["--file_format=onnx", "--batch_size=2"])
    assert (config.export.batch_size, config.data.batch_size) == (2, 256)
    config = load_config(None, ["--batch_size=2"])
    assert (config.export.batch_size, config.data.batch_size) == (1, 2)


@pytest.mark.parametrize(
    "path, keys",
    [
        (TRAIN_STANDALONE, ["enable_modelarts", *[key for key in ORIGINAL_8P_FLAT if key not in ("file_name", "file_format", "ckpt_file")]]),
        (TRAIN_8P, ["enable_modelarts", "data_url", "train_url", "checkpoint_url", "output_path",
                    *[key for key in ORIGINAL_8P_FLAT if key not in ("file_name", "file_format", "ckpt_file")]]),
        (EVAL, ["enable_modelarts", "interpolation", "eval_path", "eval_image_size", "eval_batch_size", "eval_interval",
                "eval_offset", "eval_num_workers", "pretrained", "backbone", "class_num", "vit_config_path", "open_profiler"]),
        (EXPORT, ["enable_modelarts", "device_target", "device_id", "data_url", "train_url", "checkpoint_url", "output_path",
                  "file_name", "file_format", "backbone", "train_image_size", "class_num", "batch_size", "vit_config_path",
                  "pretrained"]),
    ],
)
def test_config_files_keep_the_original_keys(path, keys):
    assert sorted(yaml.safe_load(path.read_text())) == sorted(keys)


def test_cloud_file_keeps_the_original_values():
    raw = yaml.safe_load(TRAIN_CLOUD.read_text())
    assert raw["enable_modelarts"] == 1
    assert raw["data_url"] == "s3://bucket-d/datasets/imagenet"
    assert raw["train_url"] == "s3://bucket-d/train"
    assert raw["checkpoint_url"] == "s3://bucket-d/model/vit_base_patch32.ckpt"
    assert raw["data_path"] == "/cache/datasets/imagenet"
    assert raw["load_path"] == "/cache/model/vit_base_patch32.ckpt"
    assert raw["output_path"] == "/cache/train"


def test_export_file_keeps_the_original_values():
    raw = yaml.safe_load(EXPORT.read_text())
    assert raw["file_name"] == "vit_base_patch32.mindir"
    assert raw["file_format"] == "MINDIR"
    assert raw["device_target"] == "Ascend"
    assert raw["batch_size"] == 1
    assert raw["vit_config_path"] == "src.vit.VitConfig"


# ---- overrides ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides",
    [["--batch_size=64"], ["--data.batch_size=64"], ["--batch_size", "64"], ["batch_size=64"], ["data.batch_size=64"]],
)
def test_batch_size_override_forms(overrides):
    assert load_config(TRAIN_8P, overrides).data.batch_size == 64


def test_overrides_beat_the_file_and_later_overrides_win(tmp_path):
    path = write(tmp_path, "batch_size: 32\nlr_max: 0.001\n")
    config = load_config(path, ["--batch_size=64", "--data.batch_size=128"])
    assert config.data.batch_size == 128
    assert config.schedule.lr_max == 0.001


def test_override_values_read_like_yaml_scalars():
    config = load_config(None, [
        "--lr_max=1e-3", "--gc_flag=TRUE", "--use_label_smooth", "0", "--eval_offset", "-1",
        "--interpolation=bicubic", "--opt=AdamW", "--pretrained=0123", "--train.compile=true",
    ])
    assert config.schedule.lr_max == 0.001
    assert config.optimizer.gc_flag is True
    assert config.loss.use_label_smooth is False
    assert config.eval.offset == -1
    assert config.data.interpolation == "BICUBIC"
    assert config.optimizer.name == "adamw"
    assert config.model.pretrained == "0123"  # text, not YAML 1.1's octal 83
    assert config.train.compile is True


def test_autoaugment_switch_maps_to_the_augment_policy():
    assert load_config(None, ["--autoaugment=0"]).data.augment == "none"
    assert load_config(None, ["--autoaugment=true"]).data.augment == "autoaugment"
    assert load_config(None, ["--autoaugment=randaugment"]).data.augment == "randaugment"
    assert to_flat(load_config(None, ["--data.augment=none"]))["autoaugment"] == 0


def test_a_name_with_an_input_size_sets_the_image_sizes():
    config = load_config(None, ["--backbone=vit_base_patch16_384"])
    assert (config.model.image_size, config.eval.image_size) == (384, 384)
    assert load_config(None, ["--backbone=vit_base_patch16_384", "--train_image_size=224"]).model.image_size == 224


# ---- native and mixed forms, round trip --------------------------------------------------------------------


def test_nested_native_yaml(tmp_path):
    path = write(tmp_path, "model:\n  name: vit_base_patch16\n  gelu: erf\ndata:\n  batch_size: 32\ntrain:\n  precision: bf16\n")
    assert changed(load_config(path)) == {
        "model.name": "vit_base_patch16", "model.gelu": "erf", "data.batch_size": 32, "train.precision": "bf16",
    }


def test_flat_nested_and_dotted_keys_mix(tmp_path):
    path = write(tmp_path, "class_num: 10\nmodel:\n  pool: mean\nschedule.max_epoch: 5\n")
    assert changed(load_config(path)) == {"model.num_classes": 10, "model.pool": "mean", "schedule.max_epoch": 5}


def test_help_and_choices_documents_are_skipped(tmp_path):
    path = write(tmp_path, "batch_size: 8\n---\nbatch_size: 'per device'\n---\ninterpolation: ['BILINEAR']\n")
    assert load_config(path).data.batch_size == 8


@pytest.mark.parametrize(
    "config_path, overrides",
    [
        (None, []),
        (EXPORT, []),
        (TRAIN_CLOUD, ["--batch_size=7", "--pretrained=", "--backbone=vit_base_patch16_384"]),
        (None, ["--data.augment=trivialaugment", "--model.ln_eps=1e-6", "--checkpoint.output_dir=runs/a b"]),
    ],
)
def test_dump_loads_back_to_an_equal_config(tmp_path, config_path, overrides):
    config = load_config(config_path, overrides)
    text = dump_yaml(config)
    yaml.safe_load(text)  # the notes are comments, so the dump stays YAML
    assert load_config(write(tmp_path, text, "dumped.yml")) == config


def test_dump_puts_notes_first_as_comments():
    text = dump_yaml(load_config(TRAIN_CLOUD))
    lines = text.splitlines()
    assert lines[0].startswith("# note: vit_config_path:")
    assert lines[len(load_config(TRAIN_CLOUD).notes)] == "model:"


def test_to_flat_writes_switches_as_numbers():
    flat = to_flat(load_config(None, ["--gc_flag=true", "--save_checkpoint=false"]))
    assert flat["gc_flag"] == 1 and flat["save_checkpoint"] == 0
    assert set(flat) == set(FLAT_KEYS)


# ---- notes -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "key, hint",
    [
        ("pretrained_url", "model.pretrained"),
        ("device_target", "train.device"),
        ("epoch_size", "schedule.max_epoch"),
        ("ckpt_path", "model.pretrained"),
        ("dataset_name", "data.train_path"),
    ],
)
def test_ignored_original_keys_leave_a_note(key, hint):
    config = load_config(None, [f"--{key}=1"])
    assert config == Config()
    (note,) = config.notes
    assert note.startswith(f"{key}:") and hint in note and "\n" not in note


def test_notes_are_not_config():
    config = load_config(TRAIN_CLOUD)
    assert config.notes and "notes" not in config_to_dict(config)


# ---- bad input ---------------------------------------------------------------------------------------------


def test_unknown_key_in_a_file_suggests_the_closest(tmp_path):
    path = write(tmp_path, "batchsize: 3\n")
    message = error_of(path)
    assert "'batchsize'" in message and str(path) in message and "did you mean 'batch_size'" in message


@pytest.mark.parametrize(
    "override, expected",
    [
        ("--lr_mx=1", "did you mean 'lr_max'"),
        ("--seed=3", "did you mean 'train.seed'"),
        ("--data.dataset_path=x", "did you mean 'data.train_path'"),
        ("--dat.batch_size=3", "unknown config group 'dat'"),
    ],
)
def test_unknown_override_key_suggests_the_closest(override, expected):
    assert expected in error_of(None, [override])


def test_unknown_group_in_a_file(tmp_path):
    assert "did you mean 'data'" in error_of(write(tmp_path, "dta:\n  batch_size: 3\n"))


def test_wrong_type_names_key_value_and_fix():
    message = error_of(None, ["--batch_size=abc"])
    assert message == (
        "config key data.batch_size (flat: batch_size) expects an integer, got 'abc' from --batch_size: "
        "pass a whole number, e.g. --batch_size=256"
    )


@pytest.mark.parametrize(
    "override, key",
    [
        ("--batch_size=-4", "data.batch_size"),
        ("--max_epoch=1.5", "schedule.max_epoch"),
        ("--class_num=true", "model.num_classes"),
        ("--gc_flag=2", "optimizer.gc_flag"),
        ("--lr_max=nan", "schedule.lr_max"),
        ("--crop_min=0", "data.crop_min"),
        ("--label_smooth_factor=1", "loss.label_smooth_factor"),
        ("--model.drop_path_rate=1.0", "model.drop_path_rate"),
        ("--interpolation=bilnear", "data.interpolation"),
        ("--loss_name=mse", "loss.name"),
        ("--train.precision=fp8", "train.precision"),
    ],
)
def test_bad_values_name_the_key(override, key):
    assert key in error_of(None, [override])


def test_negative_batch_size_in_a_file_names_the_range(tmp_path):
    message = error_of(write(tmp_path, "data:\n  batch_size: -1\n"))
    assert "data.batch_size" in message and ">= 1" in message and "-1" in message


def test_bad_choice_lists_the_choices():
    message = error_of(None, ["--model.pool=cls"])
    assert "model.pool" in message and "'cls'" in message and "token, mean" in message
    assert "did you mean 'BILINEAR'" in error_of(None, ["--interpolation=bilnear"])


def test_image_size_must_divide_by_the_patch():
    message = error_of(None, ["--train_image_size=200"])
    assert "model.image_size" in message and "200" in message and "32" in message
    assert "eval.image_size" in error_of(None, ["--eval_image_size=100"])


def test_unknown_model_name():
    message = error_of(None, ["--backbone=vit_bse_patch32"])
    assert "model.name" in message and "vit_base_patch32" in message


def test_missing_file():
    assert error_of("no/such.yml") == "config file 'no/such.yml' not found: check the --config_path"


def test_invalid_yaml_names_the_line(tmp_path):
    message = error_of(write(tmp_path, "batch_size: 3\nlr_max: [0.1\n"))
    assert "not valid YAML" in message and "line 3" in message and "started at line 2" in message


def test_more_than_three_documents(tmp_path):
    assert "4 YAML documents" in error_of(write(tmp_path, "a: 1\n---\nb: 2\n---\nc: 3\n---\nd: 4\n"))


def test_top_level_must_be_a_mapping(tmp_path):
    assert "mapping" in error_of(write(tmp_path, "- batch_size\n- 3\n"))


def test_a_key_set_twice_in_one_file(tmp_path):
    message = error_of(write(tmp_path, "batch_size: 3\ndata:\n  batch_size: 4\n"))
    assert "data.batch_size" in message and "twice" in message


@pytest.mark.parametrize("overrides", [["--compile"], ["compile"]])
def test_override_without_a_value(overrides):
    assert "compile" in error_of(None, overrides)


# ---- the option table --------------------------------------------------------------------------------------


def test_every_default_passes_its_own_checks():
    for option in OPTIONS.values():
        assert not option.choices or option.default in option.choices, option.key
        assert option.type is str or not option.broken_bound(option.default), option.key
        assert option.help, option.key


def test_flat_keys_are_unique():
    assert len(FLAT_KEYS) == sum(1 for option in OPTIONS.values() if option.flat)
