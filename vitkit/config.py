"""One typed config: defaults, YAML files, command-line overrides and the original's flat keys.

Every option is one dataclass field below. Its metadata holds the original's YAML key (``flat``), its range or
choices and its help text; the flat-key map, the checks and the help are all read from there, so each default
and each rule is written exactly once. The defaults are the original's 8-device ImageNet recipe
(``configs/vit_patch32_imagenet2012_config.yml``).

Sources, later ones winning: the defaults, then a YAML file, then command-line overrides. A file may use the
original's flat keys (``batch_size: 64``), the native nested form (``data: {batch_size: 64}``), dotted names
(``data.batch_size: 64``) or any mix; an override is ``--key=value``, ``--key value`` or ``key=value`` with a flat
or dotted key.

Hostile input gets one short error, never a traceback or a hang: a config file is at most 1 MiB, its YAML holds no
aliases and nests at most 64 levels (``_BoundedLoader``), an error echoes at most about 200 characters of a value,
and every option that sizes an allocation or a loop has an upper bound (``le=``) beside its default.
"""
import dataclasses
import difflib
import math
import os
import re
from dataclasses import dataclass, field, fields
from typing import Any, Sequence

import yaml

from vitkit.data.loader import MAX_REPEATED_AUG
from vitkit.data.transforms import AUGMENTS, CROP_MIN_RANGE, INTERPOLATIONS, NORMALIZATIONS
from vitkit.engine.losses import LOSS_NAMES
from vitkit.engine.lr_schedule import LR_MODES
from vitkit.engine.optim import BETA_RANGE, OPTIMIZER_NAMES
from vitkit.errors import VitkitError
from vitkit.model.presets import resolve_preset
from vitkit.model.vit import (ARCH_DEFAULTS, ARCH_FIELDS, MAX_IMAGE_SIDE, STYLES, broken_bound, range_text,
                              size_problem)


# Upper bounds of the options that size an allocation or a loop: far past any real run, short of what would take
# the machine's memory or run for ever (a config typo such as max_epoch=3000000 fails here, not after a week).
MAX_EPOCHS = 100_000
MAX_BATCH = 1_000_000
MAX_EXPORT_BATCH = 4096  # the export traces and checks the model on a batch this size
MAX_WORKERS = 1024
MAX_SEED = 2**63 - 1  # torch.manual_seed's range
MAX_ACCUM_STEPS = 4096  # micro-batches per optimizer step; 4096 x batch 256 is a 1M-image global batch


def _option(default, help, *, flat=None, choices=(), ge=None, gt=None, le=None, lt=None):
    """A config field; its metadata is the one place its flat key, checks and help are written."""
    metadata = dict(help=help, flat=flat, choices=tuple(choices), ge=ge, gt=gt, le=le, lt=lt)
    return field(default=default, metadata=metadata)


@dataclass
class ModelConfig:
    """The model group: these fields, then every ViTArch field the architecture exposes (see _with_arch_options),
    which build_model passes straight through."""

    name: str = _option("vit_base_patch32", "architecture preset (`vitkit models` lists them)", flat="backbone")
    pretrained: str = _option("", "checkpoint to start from; '' trains from scratch", flat="pretrained")
    components: str = _option(
        "", "dotted path of a ViTComponents subclass that swaps norms, blocks, heads or inits; '' = vitkit's own "
        "(the original's 'src.vit.VitConfig' means the same)", flat="vit_config_path",
    )
    grad_checkpointing: bool = _option(
        False, "activation checkpointing per block while training: each block's activations are recomputed in the "
        "backward pass instead of kept, for less memory at about one more forward pass of compute; same gradients"
    )


def _with_arch_options(declared: type) -> type:
    """`declared` with a config option for each ViTArch field the architecture exposes, after `name`.

    Default, choices, range and help come from the field itself (vitkit.model.vit), so a model option is declared
    in one place; `config=` there says what differs in the config (a flat key, the original's default)."""
    arch_options = []
    for name, item in ARCH_FIELDS.items():
        config = item.metadata.get("config")
        if config is None:
            continue
        metadata = {key: item.metadata[key] for key in ("help", "choices", "ge", "gt", "le", "lt")}
        metadata["flat"] = None
        metadata.update({key: value for key, value in config.items() if key != "default"})
        default = config.get("default", ARCH_DEFAULTS[name])
        arch_options.append((name, type(default), field(default=default, metadata=metadata)))
    own = [(item.name, item.type, item) for item in fields(declared)]
    return dataclasses.make_dataclass(declared.__name__, [own[0], *arch_options, *own[1:]], namespace={
        "__doc__": declared.__doc__, "__module__": declared.__module__,
    })


ModelConfig = _with_arch_options(ModelConfig)


@dataclass
class DataConfig:
    train_path: str = _option(
        "/opt/npu/datasets/imagenet/train", "training images, one folder per class", flat="dataset_path"
    )
    val_path: str = _option(
        "/opt/npu/datasets/imagenet/val", "validation images, one folder per class", flat="eval_path"
    )
    interpolation: str = _option(
        "BILINEAR", "resize filter; LANCZOS, BOX, HAMMING and PILCUBIC resize with PIL's own filter; the MindSpore "
        "names LINEAR, CUBIC, ANTIALIAS and AREA mean BILINEAR, BICUBIC, LANCZOS and BOX (OpenCV's area filter: "
        "equal for whole shrink factors, close otherwise)",
        flat="interpolation",
        choices=tuple(INTERPOLATIONS),
    )
    normalization: str = _option(
        "imagenet", "input mean/std: imagenet (the original's) or inception (mean and std 0.5, what Flax .npz and "
        "Hugging Face ViT weights expect)", choices=tuple(NORMALIZATIONS),
    )
    crop_min: float = _option(0.05, "smallest area fraction of a random resized crop", flat="crop_min", **CROP_MIN_RANGE)
    random_crop: bool = _option(
        True, "random resized crop in training; false resizes the whole image (small centred images, e.g. 28 px)"
    )
    batch_size: int = _option(256, "training images per device per step", flat="batch_size", ge=1, le=MAX_BATCH)
    num_workers: int = _option(
        14, "training loader processes per device", flat="train_num_workers", ge=0, le=MAX_WORKERS
    )
    augment: str = _option(
        "autoaugment", "policy after crop and flip; the flat autoaugment key is the original's 1/0 switch "
        "between autoaugment and none; three_augment is DeiT III's (one of grayscale, solarize, blur, then color "
        "jitter 0.3)", flat="autoaugment",
        choices=AUGMENTS,
    )
    randaugment_ops: int = _option(2, "operations per image when augment is randaugment", ge=0, le=100)
    randaugment_magnitude: int = _option(9, "strength of each randaugment operation, 0 to 30", ge=0, le=30)
    random_erasing: float = _option(0.0, "probability of erasing a random rectangle", ge=0, le=1)
    decode_on: str = _option(
        "workers", "where training JPEGs are decoded: the loader workers (CPU), or the training device (nvJPEG on a "
        "CUDA GPU; random resized crop and flip only, no augment policy or erasing)", choices=("workers", "device"),
    )
    max_image_pixels: int = _option(
        100_000_000, "images whose header promises more pixels are skipped as unreadable before any decode (a "
        "decompression bomb); PIL's own limit is 89,478,485", ge=1, le=1_000_000_000,
    )
    mixup: float = _option(0.2, "MixUp Beta(alpha, alpha) alpha, one draw per batch; 0 disables", flat="mixup", ge=0)
    cutmix: float = _option(0.0, "CutMix Beta alpha (the original has none); 0 disables", ge=0)
    repeated_aug: int = _option(
        1, "repeated augmentation (DeiT's 3): each epoch reads about 1/k of the images k times each, every copy "
        "augmented differently and, with k <= processes, on a different process; 1 = off", ge=1, le=MAX_REPEATED_AUG,
    )


@dataclass
class OptimizerConfig:
    name: str = _option("adamw", "optimizer", flat="opt", choices=OPTIMIZER_NAMES)
    beta1: float = _option(0.9, "AdamW first-moment decay", flat="beta1", **BETA_RANGE)
    beta2: float = _option(0.999, "AdamW second-moment decay", flat="beta2", **BETA_RANGE)
    eps: float = _option(1e-8, "AdamW epsilon", gt=0)
    weight_decay: float = _option(0.05, "decoupled weight decay", flat="weight_decay", ge=0)
    no_weight_decay_filter: str = _option(
        "beta,bias", "comma-separated name parts of parameters that skip weight decay", flat="no_weight_decay_filter"
    )
    gc_flag: bool = _option(False, "gradient centralization (a no-op in the original)", flat="gc_flag")
    clip_grad_norm: float = _option(0.0, "clip the global gradient norm to this; 0 = off", ge=0)
    layer_decay: float = _option(
        1.0, "layer-wise learning-rate decay (BEiT, timm): the patch embedding, class token and position embedding "
        "are layer 0, block i is layer i+1, the final norm and head layer depth+1, and layer l learns at "
        "layer_decay ** (depth+1-l) times the scheduled rate; 1 = off (fine-tuning uses 0.65-0.75)", gt=0, le=1,
    )


@dataclass
class ScheduleConfig:
    lr_decay_mode: str = _option(
        "cosine", "per-step learning-rate curve after warmup", flat="lr_decay_mode",
        choices=LR_MODES,
    )
    lr_init: float = _option(0.0, "learning rate at the first warmup step", flat="lr_init", ge=0)
    lr_max: float = _option(
        0.00355, "peak learning rate (the original scales it with the device count)", flat="lr_max", ge=0
    )
    lr_min: float = _option(
        0.0, "final learning rate (cosine ignores it, as in the original; cosine_min uses it)", flat="lr_min", ge=0
    )
    max_epoch: int = _option(300, "training epochs", flat="max_epoch", ge=1, le=MAX_EPOCHS)
    warmup_epochs: float = _option(
        40.0, "epochs of warmup from lr_init to lr_max", flat="warmup_epochs", ge=0, le=MAX_EPOCHS
    )
    poly_power: float = _option(2.0, "exponent of the poly curve", gt=0)


@dataclass
class LossConfig:
    name: str = _option(
        "ce_smooth_mixup", "training loss", flat="loss_name",
        choices=LOSS_NAMES,
    )
    use_label_smooth: bool = _option(True, "apply label smoothing; false sets the factor to 0", flat="use_label_smooth")
    label_smooth_factor: float = _option(
        0.1, "probability mass spread over the other classes", flat="label_smooth_factor", ge=0, lt=1
    )


@dataclass
class TrainConfig:
    precision: str = _option(
        "auto", "compute precision (parameters stay fp32); auto: bf16 on a GPU that has it, else fp16 with the "
        "dynamic loss scaler, fp32 on the CPU", choices=("auto", "fp32", "bf16", "fp16"),
    )
    loss_scale: float = _option(1024.0, "initial fp16 loss scale (fixed in the original)", flat="loss_scale", gt=0)
    seed: int = _option(1, "seed for init, shuffling and augmentation", ge=0, le=MAX_SEED)
    device: str = _option("auto", "auto, cpu, cuda or cuda:N")
    compile: bool = _option(False, "run the model through torch.compile")
    open_profiler: bool = _option(False, "profile the run (use a small dataset and max_epoch=1)", flat="open_profiler")
    resume: str = _option("", "training checkpoint to continue from; '' starts afresh")
    accum_steps: int = _option(
        1, "gradient accumulation: micro-batches of data.batch_size per optimizer step, so a step sees "
        "batch_size x accum_steps x processes images; the lr schedule, step lines, save_checkpoint_steps and "
        "resume count optimizer steps, and checkpoints fall only between them", ge=1, le=MAX_ACCUM_STEPS,
    )
    ema_decay: float = _option(
        0.0, "keep an exponential moving average of the weights (timm's ModelEmaV3), updated after every optimizer "
        "step, evaluated beside the raw weights and saved as <checkpoint>.ema.safetensors (use it with --ema); "
        "0 = off, typical 0.9998-0.99996", ge=0, lt=1,
    )
    ema_warmup: bool = _option(
        True, "ramp the EMA decay up as timm's ModelEmaV3 warm-up: min(ema_decay, 1 - (1 + n)^(-2/3)) at the "
        "n-th update after the first, which copies the weights; false: ema_decay from the second update on"
    )
    freeze: str = _option(
        "", "parameters left untouched while fine-tuning: 'backbone' trains the head alone (a linear probe), an "
        "integer N freezes the patch embedding, class token, position embedding and the first N blocks; '' = none"
    )


@dataclass
class EvalConfig:
    image_size: int = _option(
        224, "evaluation crop side in pixels, a multiple of the patch size", flat="eval_image_size", gt=0,
        le=MAX_IMAGE_SIDE,
    )
    resize_size: int = _option(
        0, "shorter side before the center crop; 0 = the original's int(int(size/0.875/16+0.5)*16), 256 for 224", ge=0,
        le=2 * MAX_IMAGE_SIDE,
    )
    batch_size: int = _option(
        256, "evaluation images per device per step", flat="eval_batch_size", ge=1, le=MAX_BATCH
    )
    interval: int = _option(1, "evaluate when (epoch + 1) % interval == offset", flat="eval_interval", ge=1)
    offset: int = _option(
        -1, "see interval; negative means max_epoch % interval, so the last epoch is evaluated", flat="eval_offset"
    )
    num_workers: int = _option(
        12, "evaluation loader processes per device", flat="eval_num_workers", ge=0, le=MAX_WORKERS
    )


@dataclass
class CheckpointConfig:
    save_checkpoint: bool = _option(True, "write checkpoints (rank 0 only)", flat="save_checkpoint")
    save_checkpoint_epochs: int = _option(
        8, "save every this many epochs, plus once at the end", flat="save_checkpoint_epochs", ge=1
    )
    save_checkpoint_steps: int = _option(0, "also save every this many steps; 0 = off", ge=0)
    keep_checkpoint_max: int = _option(3, "newest checkpoints kept", flat="keep_checkpoint_max", ge=1)
    output_dir: str = _option("./outputs", "checkpoints and logs", flat="save_checkpoint_path")
    overwrite: bool = _option(False, "allow writing into an output_dir that already holds checkpoints")
    sharded: bool = _option(
        False, "each rank writes its own shards (a torch.distributed.checkpoint folder) instead of rank 0 "
        "gathering the full model and optimizer; resumes on any process count",
    )


@dataclass
class DistributedConfig:
    strategy: str = _option("ddp", "how replicas share the model", choices=("ddp", "fsdp"))
    backend: str = _option(
        "auto", "process-group backend; auto = nccl on CUDA, else gloo", choices=("auto", "nccl", "gloo")
    )
    timeout_s: int = _option(1800, "seconds a collective may wait before the run fails", ge=1, le=7 * 24 * 3600)


@dataclass
class ExportConfig:
    file_name: str = _option("vit_base_patch32.onnx", "exported model file", flat="file_name")
    file_format: str = _option(
        "ONNX", "ONNX or PT2 (torch.export); the original's MINDIR and AIR become ONNX", flat="file_format",
        choices=("ONNX", "PT2", "MINDIR", "AIR"),
    )
    ckpt_file: str = _option(
        "", "checkpoint to export (the original's later export key); '' = model.pretrained", flat="ckpt_file"
    )
    batch_size: int = _option(
        1, "batch dimension of the exported input (flat batch_size in an export file)", ge=1, le=MAX_EXPORT_BATCH
    )
    image_size: int = _option(
        0, "side of the exported input in pixels; 0 = the checkpoint's own", ge=0, le=MAX_IMAGE_SIDE
    )
    opset: int = _option(
        23, "ONNX opset; 23 and up make attention one ONNX Attention node per block, which needs onnxruntime >= 1.23 "
        "(the fastest on CPU); 18-22 keep MatMul -> Softmax -> MatMul for older runtimes", ge=18
    )
    dynamic_batch: bool = _option(False, "let the exported model take any batch size")
    dynamic_image_size: bool = _option(
        False, "let the exported model take any image side that is a multiple of the patch (position embeddings "
        "are resampled bicubically inside the graph)",
    )
    int8: bool = _option(False, "also write an int8 dynamically quantized ONNX copy, <name>.int8.onnx")


@dataclass
class LoggingConfig:
    log_dir: str = _option("", "where logs go; '' = checkpoint.output_dir")
    jsonl: bool = _option(True, "also write machine-readable JSON lines")
    progress: str = _option(
        "auto", "progress display: a bar on terminals, plain lines otherwise", choices=("auto", "bar", "plain")
    )
    log_interval: int = _option(
        50, "a step line (loss, lr, img/s, data wait, ETA) every this many steps, terminal or not; 0 = none", ge=0
    )
    tensorboard: bool = _option(True, "write TensorBoard event files under the log folder (if tensorboard is installed)")
    wandb: bool = _option(False, "also log to Weights & Biases (pip install 'vitkit[wandb]'; WANDB_MODE=offline stays local)")
    wandb_project: str = _option("vitkit", "the Weights & Biases project")


MAX_SYNC_WAIT_S = 7 * 24 * 3600


@dataclass
class StorageConfig:
    """Remote paths (s3://, obs://, gs://) and the original's ModelArts sync keys; see docs/cloud.md."""

    endpoint_url: str = _option(
        "", "S3-compatible endpoint for s3:// and obs:// (OBS, MinIO); '' = AWS_ENDPOINT_URL, else AWS itself"
    )
    cache_dir: str = _option("", "local copies of remote data, models and run folders; '' = $VITKIT_CACHE or "
                             "~/.cache/vitkit")
    sync_wait_s: int = _option(
        24 * 3600, "seconds a process waits for its machine's first process to copy remote data in", ge=1,
        le=MAX_SYNC_WAIT_S,
    )
    enable_modelarts: bool = _option(
        False, "the original's cloud flow: copy data_url, checkpoint_url and train_url in before the run and "
        "output_path out to train_url at every checkpoint and at the end", flat="enable_modelarts",
    )
    data_url: str = _option("", "with enable_modelarts: the remote data set copied to data_path", flat="data_url")
    train_url: str = _option(
        "", "with enable_modelarts: the remote run folder, copied to output_path first and mirrored from it",
        flat="train_url",
    )
    checkpoint_url: str = _option(
        "", "with enable_modelarts: a remote checkpoint (file or folder) copied to load_path", flat="checkpoint_url"
    )
    data_path: str = _option("/cache/data", "with enable_modelarts: the local copy of data_url", flat="data_path")
    output_path: str = _option(
        "/cache/train", "with enable_modelarts: the local run folder mirrored to train_url; a relative "
        "checkpoint.output_dir lies inside it", flat="output_path",
    )
    load_path: str = _option(
        "/cache/checkpoint_path", "with enable_modelarts: the local copy of checkpoint_url", flat="load_path"
    )


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)

    # Why keys were ignored or values translated: beside the options, never printed, compared or dumped as config.
    notes: list[str] = field(default_factory=list, repr=False, compare=False, metadata={"group": False})
    # Dotted keys the YAML file or the overrides set, for commands where unset keys defer to the model's own.
    explicit_keys: set[str] = field(default_factory=set, repr=False, compare=False, metadata={"group": False})


@dataclass(frozen=True)
class Option:
    """One config key as the loader and the help see it, derived from its field."""

    group: str
    name: str
    type: type
    default: Any
    help: str
    flat: str | None
    choices: tuple[str, ...]
    ge: float | None
    gt: float | None
    le: float | None
    lt: float | None

    @property
    def key(self) -> str:
        return f"{self.group}.{self.name}"

    @property
    def range_text(self) -> str:
        """The allowed range in words ('>= 1', 'in [0, 1)'), '' when any value goes."""
        return range_text(self.ge, self.gt, self.le, self.lt)

    def broken_bound(self, value) -> str:
        """The first bound `value` breaks, in words ('>= 1', '<= 100000'); '' when it is in range."""
        return broken_bound(value, self.ge, self.gt, self.le, self.lt)


GROUPS: dict[str, type] = {group.name: group.type for group in fields(Config) if group.metadata.get("group", True)}
OPTIONS: dict[str, Option] = {
    f"{group}.{item.name}": Option(group, item.name, item.type, item.default, **item.metadata)
    for group, group_type in GROUPS.items()
    for item in fields(group_type)
}
FLAT_KEYS: dict[str, Option] = {option.flat: option for option in OPTIONS.values() if option.flat}

# The original's export YAML reuses `batch_size` for the exported input's batch. So a flat document (the file, or
# the command line) that names one of these export keys is an export document, and its flat `batch_size` sets
# export.batch_size instead of data.batch_size. An export file makes the command line an export document too.
_EXPORT_DOCUMENT_KEYS = ("file_format", "file_name")

# Original keys with no meaning in PyTorch: accepted, never applied, and each explained in Config.notes.
_IGNORED_KEYS = {
    "device_target": "vitkit picks the device itself: set train.device (auto/cpu/cuda)",
    "device_id": "the Ascend card to use; set train.device=cuda:N or CUDA_VISIBLE_DEVICES",
    "pretrained_url": "the transfer script's OBS checkpoint; set model.pretrained to a local file",
    "enable_transfer": "the transfer script's switch for pretrained_url; set model.pretrained to fine-tune",
    "epoch_size": "the transfer script's epoch count; use schedule.max_epoch",
    "dataset_name": "always imagenet in the original's train and eval; vitkit reads class folders at data.train_path",
    "ckpt_path": "the transfer script's checkpoint found under load_path; set model.pretrained",
}

_ORIGINAL_COMPONENTS = "src.vit.VitConfig"
_MINDSPORE_FORMATS = ("MINDIR", "AIR")
_MINDSPORE_SUFFIXES = (".mindir", ".air")
_FORMAT_SUFFIXES = {"ONNX": ".onnx", "PT2": ".pt2"}
_MAX_DOCUMENTS = 3  # the original's config, help and choices documents
_INVALID = object()
_TYPE_WORDS = {
    int: ("an integer", "a whole number"),
    float: ("a number", "a number"),
    bool: ("true or false", "true or false (or 1/0)"),
    str: ("text", "a string"),
}


@dataclass(frozen=True)
class _Setting:
    """One value the user gave, with where it came from, so errors and notes can point at it."""

    option: Option
    value: Any  # as YAML read it
    key: str  # as written: a flat key or a dotted name
    source: str  # the file path, or the override's key as typed (--batch_size)
    from_cli: bool
    text: str | None = None  # an override's text before YAML read it

    @property
    def is_flat(self) -> bool:
        return "." not in self.key


def load_config(config_path: str | os.PathLike | None = None, overrides: Sequence[str] = ()) -> Config:
    """The config from the defaults, then the YAML file at `config_path`, then `overrides`; checked throughout."""
    config = Config()
    file_settings: list[_Setting] = []
    is_export_file = False
    if config_path is not None:
        document = _read_document(config_path)
        is_export_file = any(key in document for key in _EXPORT_DOCUMENT_KEYS)
        file_settings = _settings_from_document(document, str(config_path), is_export_file, config.notes)
    cli_settings = _settings_from_overrides(overrides, is_export_file, config.notes)

    origins: dict[str, _Setting] = {}
    for setting in file_settings + cli_settings:
        _apply(config, setting)
        origins[setting.option.key] = setting
    _check_together(config, origins)
    config.explicit_keys = set(origins)
    return config


def config_to_dict(config: Config) -> dict:
    """The nested native form: {group: {field: value}} in definition order."""
    return {name: dataclasses.asdict(getattr(config, name)) for name in GROUPS}


def dump_yaml(config: Config) -> str:
    """The nested native form as YAML that load_config reads back to an equal Config; notes lead as comments."""
    notes = "".join(f"# note: {note}\n" for note in config.notes)
    return notes + yaml.safe_dump(config_to_dict(config), sort_keys=False, allow_unicode=True)


def to_flat(config: Config) -> dict:
    """Every original flat key that has a native field, with its value written the original's way (switches as 0/1)."""
    return {option.flat: _flat_value(option, _get(config, option)) for option in FLAT_KEYS.values()}


def _get(config: Config, option: Option):
    return getattr(getattr(config, option.group), option.name)


def _set(config: Config, option: Option, value) -> None:
    setattr(getattr(config, option.group), option.name, value)


def _add_note(notes: list[str], note: str) -> None:
    if note not in notes:
        notes.append(note)


def _one_line(text) -> str:
    return " ".join(str(text).split())


# ---- reading ---------------------------------------------------------------------------------------------------


_MAX_FILE_BYTES = 1 << 20  # a config is a few kilobytes (the original's largest is 3 KB)
_MAX_NESTING = 64  # nested YAML collections; a config's values are two levels deep at most
_MAX_SHOWN = 200  # characters of a value, key or parser message that an error echoes


class _YamlLimit(yaml.YAMLError):
    """A YAML document past what a config may hold: where, what, and how to fix it."""

    def __init__(self, problem: str, fix: str, mark):
        super().__init__(problem)
        self.problem, self.fix, self.problem_mark = problem, fix, mark

    def where(self) -> str:
        mark = self.problem_mark
        return f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""


class _BoundedLoader(yaml.SafeLoader):
    """PyYAML's safe loader that refuses aliases and deep nesting, the two ways a small document grows huge.

    An alias repeats its anchor's value: nine levels of nine aliases (the 'billion laughs') make 10**9 values from a
    few hundred bytes, which any error message's repr would then walk. Each nesting level costs the composer and
    constructor Python stack frames, so 20,000 '[' end in a RecursionError. Neither is needed in a config. Integers
    past Python's 4300-digit conversion limit are read as text, which the option's check then refuses.
    """

    def __init__(self, stream):
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            raise _YamlLimit("uses a YAML alias (*name)", "write the value out in full; vitkit does not expand "
                             "aliases", self.peek_event().start_mark)
        self._depth += 1
        try:
            if self._depth > _MAX_NESTING:
                raise _YamlLimit(f"is nested deeper than {_MAX_NESTING} levels", "a config value is a number, a word "
                                 "or a short list", self.peek_event().start_mark)
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def _construct_int(self, node):
        try:
            return self.construct_yaml_int(node)
        except ValueError:  # more digits than int() converts
            return self.construct_scalar(node)


_BoundedLoader.add_constructor("tag:yaml.org,2002:int", _BoundedLoader._construct_int)


def _clip(text, limit: int = _MAX_SHOWN) -> str:
    """One line of at most about `limit` characters: a long value is cut, with its full length said."""
    text = str(text)
    if len(text) > limit:
        text = f"{text[:limit]}... ({len(text):,} characters)"
    return " ".join(text.split()) if "\n" in text or "\r" in text else text


def _shown(value) -> str:
    """A value as an error echoes it: its repr, clipped."""
    if isinstance(value, str) and len(value) > _MAX_SHOWN:
        return _clip(f"{value[:_MAX_SHOWN]!r}... ({len(value):,} characters)", 2 * _MAX_SHOWN)
    return _clip(repr(value))


def _read_document(path) -> dict:
    """The first YAML document of the file; the original's optional help and choices documents are skipped.

    The file may be at most 1 MiB, and its YAML may hold no aliases and nest at most 64 levels (_BoundedLoader)."""
    try:
        with open(path, "rb") as file:
            raw = file.read(_MAX_FILE_BYTES + 1)
        if len(raw) > _MAX_FILE_BYTES:
            raise VitkitError(
                f"config file '{path}' is over 1 MiB; a config is a few kilobytes: check --config_path names the "
                "config, not a data or weights file"
            )
        text = raw.decode("utf-8")
    except FileNotFoundError:
        raise VitkitError(f"config file '{path}' not found: check the --config_path") from None
    except (OSError, UnicodeDecodeError) as exc:
        reason = getattr(exc, "strerror", None) or exc
        raise VitkitError(
            f"cannot read config file '{path}' ({_one_line(reason)}): pass a readable UTF-8 YAML file"
        ) from None
    try:
        documents = list(yaml.load_all(text, Loader=_BoundedLoader))
    except _YamlLimit as exc:
        raise VitkitError(f"config file '{path}' {exc.problem}{exc.where()}: {exc.fix}") from None
    except yaml.YAMLError as exc:
        raise VitkitError(f"config file '{path}' is not valid YAML{_yaml_problem(exc)}: fix the syntax there") from None
    if len(documents) > _MAX_DOCUMENTS:
        raise VitkitError(
            f"config file '{path}' has {len(documents)} YAML documents, at most {_MAX_DOCUMENTS} are read "
            "(config, help, choices): remove the extra '---' sections"
        )
    document = documents[0] if documents else None
    if document is None:
        return {}
    if not isinstance(document, dict):
        raise VitkitError(
            f"config file '{path}' must start with a mapping of keys to values, got {type(document).__name__}: "
            "write one 'key: value' per line"
        )
    return document


def _yaml_problem(exc: yaml.YAMLError) -> str:
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
    if not problem:
        return where
    # A problem found at the end of the file usually starts where the context began (an unclosed '[' or quote).
    context = getattr(exc, "context", None)
    context_mark = getattr(exc, "context_mark", None)
    started = f", {_clip(context)} started at line {context_mark.line + 1}" if context and context_mark else ""
    return f"{where} ({_clip(problem)}{started})"


def _settings_from_document(document: dict, path: str, is_export: bool, notes: list[str]) -> list[_Setting]:
    settings: dict[str, _Setting] = {}
    for raw_key, value in document.items():
        key = str(raw_key)
        if key in GROUPS:
            if value is None:
                continue
            if not isinstance(value, dict):
                raise VitkitError(
                    f"config group '{key}' in {path} must be a mapping of its fields, got {_shown(value)}: "
                    f"write '{key}:' then indented 'field: value' lines"
                )
            written = [(f"{key}.{name}", inner) for name, inner in value.items()]
        elif isinstance(value, dict) and key not in FLAT_KEYS and key not in OPTIONS and key not in _IGNORED_KEYS:
            raise _unknown_group_error(key, path)
        else:
            written = [(key, value)]
        for dotted_or_flat, inner in written:
            option = _find_option(dotted_or_flat, is_export, path, notes)
            if option is None:
                continue
            if option.key in settings:
                first = settings[option.key].key
                raise VitkitError(
                    f"config key {option.key} is set twice in {path} (as '{_clip(first)}' and "
                    f"'{_clip(dotted_or_flat)}'): keep one"
                )
            settings[option.key] = _Setting(option, inner, dotted_or_flat, path, from_cli=False)
    return list(settings.values())


def _settings_from_overrides(overrides: Sequence[str], is_export_file: bool, notes: list[str]) -> list[_Setting]:
    parsed = _split_overrides(overrides)
    is_export = is_export_file or any(key in _EXPORT_DOCUMENT_KEYS for key, _, _ in parsed)
    settings = []
    for key, text, typed_key in parsed:
        option = _find_option(key, is_export, typed_key, notes)
        if option is not None:
            settings.append(_Setting(option, _read_override_value(text), key, typed_key, from_cli=True, text=text))
    return settings


def _split_overrides(overrides: Sequence[str]) -> list[tuple[str, str, str]]:
    """(key, value text, the key as typed with its dashes) for each override, in order."""
    parsed = []
    tokens = list(overrides)
    position = 0
    while position < len(tokens):
        token = tokens[position]
        body = token[2:] if token.startswith("--") else token
        has_next_value = position + 1 < len(tokens) and not tokens[position + 1].startswith("--")
        if "=" in body:
            key, _, text = body.partition("=")
            parsed.append((key, text, token.partition("=")[0]))
        elif token.startswith("--") and has_next_value:
            position += 1
            parsed.append((body, tokens[position], token))
        elif token.startswith("--"):
            raise VitkitError(f"override {_clip(token)} has no value: write {_clip(token)}=VALUE")
        else:
            raise VitkitError(f"cannot read override '{_clip(token)}': write --key=value, --key value or key=value")
        position += 1
    return parsed


def _read_override_value(text: str):
    """The override's text read like a YAML scalar, so '64' is 64 and 'true' is True. Text past _BoundedLoader's
    limits (an alias such as '*.onnx', deep nesting) stays text, which only a text option takes."""
    try:
        return yaml.load(text, Loader=_BoundedLoader)
    except yaml.YAMLError:
        # Not YAML (a path like 'a: b' or '[x'): the text itself is the value.
        return text


def _find_option(key: str, is_export: bool, where: str, notes: list[str]) -> Option | None:
    """The option a written key names; None for an original key vitkit ignores, which gets a note instead."""
    if key in OPTIONS:
        return OPTIONS[key]
    if is_export and key == "batch_size":
        return OPTIONS["export.batch_size"]
    if key in FLAT_KEYS:
        return FLAT_KEYS[key]
    if key in _IGNORED_KEYS:
        _add_note(notes, f"{key}: {_IGNORED_KEYS[key]}")
        return None
    group, dot, _ = key.partition(".")
    if dot and group not in GROUPS:
        raise _unknown_group_error(group, where)
    raise _unknown_key_error(key, where)


def _unknown_group_error(group: str, where: str) -> VitkitError:
    return VitkitError(
        f"unknown config group '{_clip(group)}' in {_clip(where)}:{_suggest(group, list(GROUPS))} "
        f"the groups are {', '.join(GROUPS)}"
    )


def _unknown_key_error(key: str, where: str) -> VitkitError:
    group, _, name = key.rpartition(".")
    # A right field name in the wrong place: 'seed' for train.seed, 'data.dataset_path' for data.train_path,
    # 'model.batch_size' for data.batch_size. The written group is preferred when it has such a field.
    same_name = [option.key for option in OPTIONS.values() if name in (option.name, option.flat)]
    in_group = [candidate for candidate in same_name if candidate.startswith(f"{group}.")]
    candidates = in_group or same_name
    if candidates:
        hint = " did you mean " + " or ".join(f"'{candidate}'" for candidate in candidates) + "?"
    else:
        hint = _suggest(key, [*FLAT_KEYS, *OPTIONS])
    if not hint:
        return VitkitError(f"unknown config key '{_clip(key)}' in {_clip(where)}: `vitkit config` lists every key")
    return VitkitError(
        f"unknown config key '{_clip(key)}' in {_clip(where)}:{hint} (see `vitkit config` for every key)"
    )


def _suggest(word: str, candidates: list[str]) -> str:
    if len(word) > _MAX_SHOWN:
        return ""  # nothing that long is close to a key
    close = difflib.get_close_matches(word, candidates, n=1)
    return f" did you mean '{close[0]}'?" if close else ""


# ---- applying and checking -------------------------------------------------------------------------------------


def _apply(config: Config, setting: _Setting) -> None:
    option = setting.option
    value = setting.value
    if setting.is_flat and option.key == "data.augment":
        value = _augment_from_switch(value)
    value = _coerce(option, value, setting.text)
    if value is _INVALID:
        noun, wanted = _TYPE_WORDS[option.type]
        raise _value_error(setting, f"expects {noun}", f"{_verb(setting)} {wanted}")
    if option.choices:
        value = _match_choice(option, value, setting)
    elif bound := option.broken_bound(value):
        raise _value_error(setting, f"must be {bound}", f"{_verb(setting)} a value {option.range_text}")
    _set(config, option, _translate(option, value, setting, config.notes))


def _augment_from_switch(value):
    # The original's `autoaugment` is an on/off switch; a policy name is taken as it is.
    switch = _as_bool(value)
    if switch is None:
        return value
    return "autoaugment" if switch else "none"


def _as_bool(value) -> bool | None:
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str):
        word = value.strip().lower()
        if word in ("true", "1"):
            return True
        if word in ("false", "0"):
            return False
    return None


def _coerce(option: Option, value, text: str | None):
    """The value as the option's type, or _INVALID."""
    if option.type is bool:
        switch = _as_bool(value)
        return _INVALID if switch is None else switch
    if option.type is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str) and re.fullmatch(r"\s*[+-]?\d+\s*", value):
            try:
                return int(value)
            except ValueError:  # more digits than int() converts (4300)
                return _INVALID
        return _INVALID
    if option.type is float:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            return _INVALID
        try:
            number = float(value)
        except ValueError:
            return _INVALID
        return number if math.isfinite(number) else _INVALID
    if isinstance(value, str):
        return value
    if text is not None:
        # YAML read this override as something other than text ('0123' as 83, '' as null); keep what was typed.
        return text
    if value is None:
        return ""
    if isinstance(value, (bool, int, float)):
        return str(value)
    return _INVALID


def _match_choice(option: Option, value: str, setting: _Setting) -> str:
    # Choices match in any case and are stored as declared ('bicubic' -> 'BICUBIC', 'AdamW' -> 'adamw').
    by_lower_case = {choice.lower(): choice for choice in option.choices}
    if value.lower() in by_lower_case:
        return by_lower_case[value.lower()]
    close = difflib.get_close_matches(value.lower(), list(by_lower_case), n=1)
    fix = f"{_verb(setting)} one of those"
    if close:
        fix = f"did you mean '{by_lower_case[close[0]]}'? {fix}"
    raise _value_error(setting, f"must be one of {', '.join(option.choices)}", fix)


def _translate(option: Option, value, setting: _Setting, notes: list[str]):
    """Original values with no PyTorch meaning become vitkit's equivalent, with a note saying so."""
    if option.key == "model.components" and value == _ORIGINAL_COMPONENTS:
        _add_note(notes, (
            f"{setting.key}: '{value}' is the original's built-in ViT; vitkit uses its own (model.components='')"
        ))
        return ""
    if option.key == "export.file_format" and value in _MINDSPORE_FORMATS:
        _add_note(notes, (
            f"{setting.key}: {value} is a MindSpore-only format; vitkit exports ONNX instead (export.file_format=ONNX)"
        ))
        return "ONNX"
    return value


def _check_together(config: Config, origins: dict[str, _Setting]) -> None:
    """Checks that involve more than one key, or a key and the preset table."""
    model = config.model
    try:
        preset = resolve_preset(model.name)
    except VitkitError as exc:
        name_setting = origins.get("model.name")
        label = _label(OPTIONS["model.name"], name_setting)
        message = str(exc)
        if len(message) > 3 * _MAX_SHOWN:  # a long name echoed: keep the start and the fix at the end
            message = f"{message[:_MAX_SHOWN]} ... {message[-_MAX_SHOWN:]}"
        raise VitkitError(f"config key {label}{_from(name_setting)}: {message}") from None
    if "image_size" in preset:
        # A timm-style name such as vit_base_patch16_384 carries its input size; it wins over the default only.
        for key in ("model.image_size", "eval.image_size"):
            if key not in origins:
                _set(config, OPTIONS[key], preset["image_size"])
                _add_note(config.notes, f"{key}: {preset['image_size']}, the input size in the model name {model.name}")
    # The style is the one switch for numerics and regularisation: what no file or override set follows it.
    for name, value in STYLES[model.style].items():
        if f"model.{name}" not in origins:
            _set(config, OPTIONS[f"model.{name}"], value)
    patch = model.patch_size or preset["patch_size"]
    width, heads = model.embed_dim or preset["embed_dim"], model.num_heads or preset["num_heads"]
    problem = size_problem(embed_dim=width, num_heads=heads)
    if problem:
        raise VitkitError(f"config keys model.embed_dim and model.num_heads: {problem}")
    for key in ("model.image_size", "eval.image_size"):
        option, setting = OPTIONS[key], origins.get(key)
        problem = size_problem(image_size=_get(config, option), patch_size=patch)
        if problem:
            raise VitkitError(f"config key {_label(option, setting)}{_from(setting)}: {problem} ({model.name})")
    _match_export_suffix(config.export, config.notes)


def _match_export_suffix(export: ExportConfig, notes: list[str]) -> None:
    # The original's export file is 'vit_base_patch32.mindir'; once the format is ONNX, the name should say so.
    stem, suffix = os.path.splitext(export.file_name)
    if suffix.lower() in _MINDSPORE_SUFFIXES or (
        suffix.lower() in _FORMAT_SUFFIXES.values() and suffix.lower() != _FORMAT_SUFFIXES[export.file_format]
    ):
        renamed = stem + _FORMAT_SUFFIXES[export.file_format]
        _add_note(notes, (
            f"export.file_name: '{export.file_name}' is written as '{renamed}' "
            f"to match export.file_format={export.file_format}"
        ))
        export.file_name = renamed


# ---- messages --------------------------------------------------------------------------------------------------


def _label(option: Option, setting: _Setting | None) -> str:
    """'data.batch_size (flat: batch_size)', naming the flat key the user wrote when there was one."""
    flat = setting.key if setting and setting.is_flat else option.flat
    return f"{option.key} (flat: {flat})" if flat else option.key


def _from(setting: _Setting | None) -> str:
    return f" from {setting.source}" if setting else ""


def _verb(setting: _Setting) -> str:
    return "pass" if setting.from_cli else "write"


def _value_error(setting: _Setting, problem: str, fix: str) -> VitkitError:
    shown = setting.text if setting.from_cli else setting.value
    return VitkitError(
        f"config key {_label(setting.option, setting)} {problem}, got {_shown(shown)} from {setting.source}: "
        f"{fix}, e.g. {_example(setting)}"
    )


def _example(setting: _Setting) -> str:
    """The key as the user wrote it, set to its default, in the form of the place it was written."""
    default = setting.option.default
    value = _flat_value(setting.option, default) if setting.is_flat else default
    shown = _yaml_scalar(value)
    return f"--{setting.key}={shown}" if setting.from_cli else f"{setting.key}: {shown}"


def _yaml_scalar(value) -> str:
    """A scalar as YAML writes it: True as true, '' as ''."""
    return yaml.safe_dump(value).removesuffix("...\n").strip()


def _flat_value(option: Option, value):
    """A value as the original's YAML writes it: switches as 0/1, the augment policy as the autoaugment switch."""
    if option.type is bool:
        return int(value)
    if option.key == "data.augment":
        return {"autoaugment": 1, "none": 0}.get(value, value)
    return value
