"""Run configuration and the three presets.

- `smoke`: seconds; tests and CI execute every notebook with it.
- `quick`: minutes on 2 CPU cores; the notebooks' default. The narrow ResNet on the procedural city.
- `paper`: GPU and real datasets with the papers' recipe (DeepLabv3+ ResNet-50 OS16, crop 768,
  SGD 0.01 poly, 40k iterations); point `data.root` (or $DGNB_DATA) at data converted by data_tools.

Two settings share them (`preset(..., setting=...)`): `dg` (labelled sources; targets only evaluated) and
`uda` (docs/adaptation.md): the UDA papers' model (DeepLab-v2 classifier on layer4, auxiliary one on layer3,
10x head learning rate), one labelled source and the unlabelled train split of `data.uda_target`.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import numbers
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from .methods.base import OptimConfig
from .models import ModelConfig

PRESETS = ("smoke", "quick", "paper")
SETTINGS = ("dg", "uda")


def dgnb_home() -> Path:
    """Where data and runs live: $DGNB_HOME, else the checkout holding this package, else ~/.cache/dgnb."""
    if "DGNB_HOME" in os.environ:
        return Path(os.environ["DGNB_HOME"]).expanduser()
    checkout = Path(__file__).resolve().parents[1]
    if (checkout / "pyproject.toml").is_file():
        return checkout
    return Path.home() / ".cache" / "dgnb"


@dataclass
class DataConfig:
    root: str = ""                      # data root; the procedural city is generated here when missing
    sources: list[str] = field(default_factory=list)
    targets: list[str] = field(default_factory=list)
    city: dict[str, Any] | None = None  # generation parameters of the procedural city (None: real data only)
    crop: tuple[int, int] = (96, 192)
    base_size: tuple[int, int] = (128, 256)
    scale: tuple[float, float] = (0.75, 1.25)
    color_jitter: float = 0.0
    batch_per_domain: int = 4
    eval_size: tuple[int, int] | None = None
    eval_limit: int | None = None       # images per domain in the final evaluation (None: all)
    val_limit: int | None = 60          # images per source domain in periodic evaluation
    train_limit: int | None = None
    eval_batch_size: int = 8
    num_workers: int = 0
    cache_images: bool = False          # keep decoded training images in memory (small datasets: the city)
    protocol: str = "19"                # class subset for mIoU: 19, 16 or 13 (SYNTHIA)
    uda_target: str | None = None       # UDA: the target whose train split is read, unlabelled (None in DG)
    target_batch: int | None = None     # UDA: target images per iteration (None: as many as source images)


@dataclass
class TrainConfig:
    iterations: int = 600
    eval_every: int = 200
    checkpoint_every: int = 100
    log_every: int = 10
    ema_decay: float = 0.0  # > 0: evaluate an exponential moving average of the weights (decay per iteration)
    device: str = "auto"   # auto | cpu | cuda | cuda:N
    amp: str = "auto"      # auto (bf16 on CUDA if supported, else fp16; off on CPU) | off | bf16 | fp16


@dataclass
class RunConfig:
    method: str = "erm"
    preset: str = "quick"
    seed: int = 0
    setting: str = "dg"  # dg | uda (docs/adaptation.md)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    hparams: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "RunConfig":
        return validate(cls(
            method=d["method"], preset=d["preset"], seed=d["seed"], setting=d.get("setting", "dg"), hparams=dict(d.get("hparams", {})),
            model=_build(ModelConfig, d["model"]), optim=_build(OptimConfig, d["optim"]),
            data=_build(DataConfig, d["data"]), train=_build(TrainConfig, d["train"]),
        ))


def _build(cls: type, values: dict[str, Any]) -> Any:
    names = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(names))
    if unknown:
        raise ValueError(f"unknown {cls.__name__} field(s) {unknown}; valid: {sorted(names)}")
    out = {}
    for k, v in values.items():
        out[k] = tuple(v) if isinstance(v, list) and "tuple" in str(names[k].type) else v
    return cls(**out)


def _city_roles() -> tuple[list[str], list[str]]:
    from .data.city import DOMAINS

    sources = [n for n, d in DOMAINS.items() if d.role == "source"]
    return sources, [n for n, d in DOMAINS.items() if d.role != "source"]


# Paper-scale evaluation resolution (W x H) per real dataset (docs/real_datasets.md, 'Evaluation resolution'): whole,
# single scale. data_tools stores each dataset at it, so `eval_size=None` evaluates every target at its own size:
# Cityscapes and BDD100K as downloaded; Mapillary val converted with `--resize 1536 --square` (RobustNet's).
PAPER_EVAL_RESOLUTION = {"cityscapes": (2048, 1024), "bdd100k": (1280, 720), "mapillary": (1536, 1536),
                         "gtav": (1914, 1052), "synthia": (1280, 760), "idd": (1920, 1080)}
PAPER_CITY = {"train": 600, "val": 150, "size": [128, 256], "seed": 0}  # procedural domains mixed into a paper run


def _paper_domains(cfg: RunConfig, overrides: dict[str, Any]) -> None:
    """Paper preset: SYNTHIA as the only source is scored on the 16-class protocol; naming procedural-city
    domains next to real ones generates them under the same data root, so both kinds mix in one run."""
    sources = list(overrides.get("data.sources", cfg.data.sources))
    targets = list(overrides.get("data.targets", cfg.data.targets))
    if sources == ["synthia"]:
        cfg.data.protocol = "16"
    try:
        from .data.city import DOMAINS
    except ImportError:
        DOMAINS = {}
    if set(sources + targets) & set(DOMAINS):
        cfg.data.city = dict(PAPER_CITY)


def preset(name: str, method: str = "erm", seed: int = 0, setting: str = "dg", **overrides: Any) -> RunConfig:
    """The configuration of `preset` for `method` in `setting` (dg or uda). `overrides` replace fields by dotted
    path, e.g. `preset("quick", "erm", **{"train.iterations": 100, "data.sources": ["source_a"]})`."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset '{name}'; choose one of {PRESETS}")
    if setting not in SETTINGS:
        raise ValueError(f"unknown setting '{setting}'; choose one of {SETTINGS} (--setting dg|uda)")
    home = dgnb_home()
    if name in ("smoke", "quick"):
        sources, targets = _city_roles()
        cfg = RunConfig(method=method, preset=name, seed=seed)
        cfg.data.sources, cfg.data.targets = sources, targets
        # narrow ResNet, OS16, no auxiliary head: the CPU budget of the course (the aux loss adds ~35% time)
        cfg.model = ModelConfig(backbone="resnet_tiny", head="deeplabv3plus", output_stride=16, head_channels=48,
                                low_proj=16, decoder_channels=32, aspp_rates=(2, 4, 6), aux=False)
        cfg.data.cache_images = True
        if name == "quick":
            cfg.data.root = str(home / "data" / "city")
            # 300 val images per domain, scored with the final weights: the resolving-power choice
            # (benchmarks/resolving_power.py; README, "How many seeds a comparison needs"). Weight averaging
            # (train.ema_decay) is available but measured worse here: poly decay already ends at lr 0.
            cfg.data.city = {"train": 600, "val": 300, "size": [128, 256], "seed": 0}
            cfg.optim = OptimConfig(lr=0.05, iterations=1200)
            cfg.train = TrainConfig(iterations=1200, eval_every=400, checkpoint_every=200)
            cfg.data.batch_per_domain = 2
        else:
            cfg.data.root = str(home / "data" / "city-smoke")
            cfg.data.city = {"train": 12, "val": 6, "size": [64, 128], "seed": 0}
            cfg.data.crop, cfg.data.base_size = (64, 96), (64, 128)
            cfg.data.batch_per_domain, cfg.data.val_limit = 2, 6
            cfg.optim = OptimConfig(lr=0.02, iterations=6)
            cfg.train = TrainConfig(iterations=6, eval_every=3, checkpoint_every=3, log_every=1)
    else:  # paper
        cfg = RunConfig(method=method, preset=name, seed=seed)
        cfg.data = DataConfig(
            root=os.environ.get("DGNB_DATA", str(home / "data" / "real")), sources=["gtav", "synthia"],
            targets=["cityscapes", "bdd100k", "mapillary"], city=None, crop=(768, 768), base_size=(1024, 2048),
            scale=(0.5, 2.0), color_jitter=0.4, batch_per_domain=4, eval_size=None, eval_batch_size=1,
            val_limit=100, num_workers=8,
        )  # eval_size None: each target whole, at the resolution data_tools stored (PAPER_EVAL_RESOLUTION)
        _paper_domains(cfg, overrides)
        cfg.model = ModelConfig(backbone="resnet50", head="deeplabv3plus", output_stride=16, pretrained=True,
                                head_channels=256, low_proj=48, aspp_rates=(6, 12, 18))
        cfg.optim = OptimConfig(lr=0.01, iterations=40000)
        cfg.train = TrainConfig(iterations=40000, eval_every=5000, checkpoint_every=1000, log_every=50)
    if setting == "uda":
        _uda_recipe(cfg, name, overrides)
    return apply_overrides(cfg, overrides)


# The UDA setting's pairs on the embedded city (docs/adaptation.md, 'The UDA setting'): one labelled source and
# the target adapted to; the notebooks use the near pair and the far pair.
UDA_SOURCE = "source_a"
UDA_PAIRS = {"near": ("source_a", "near"), "far": ("source_a", "far_fog")}


def _uda_recipe(cfg: RunConfig, name: str, overrides: dict[str, Any]) -> None:
    """The UDA papers' model and optimiser (DeepLab-v2 family): the ASPP-v2 classifier on layer4 (four dilated
    3x3 convs, summed) and an auxiliary one on layer3, 10x learning rate on both heads; one labelled source;
    the unlabelled train split of `data.uda_target`; as many target images per iteration as source images."""
    cfg.setting = "uda"
    cfg.optim.head_lr_mult = 10.0
    if name in ("smoke", "quick"):
        _, targets = _city_roles()
        cfg.data.sources, cfg.data.targets, cfg.data.uda_target = [UDA_SOURCE], targets, UDA_PAIRS["near"][1]
        # OS8 as in the papers: layer4 is 12x24 on a 96x192 crop, so the four dilations keep the paper's
        # proportions (6/12/18/24 on 65x129 maps); discriminators a quarter as wide as the papers'
        cfg.model = ModelConfig(backbone="resnet_tiny", head="deeplabv2", output_stride=8, aspp_rates=(1, 2, 3, 4),
                                aux=True, disc_channels=16)
        if name == "quick":
            cfg.data.batch_per_domain = 4
            cfg.optim.lr = 0.01
            cfg.optim.iterations = cfg.train.iterations = 800  # AdaptSegNet, the slowest: ~450 CPU-seconds
            cfg.train.eval_every, cfg.train.checkpoint_every = 200, 200
        else:
            cfg.train.eval_every = 3
    else:  # GTAV -> Cityscapes, DeepLab-v2 ResNet-101 OS8 (ImageNet weights), AdaptSegNet's optimiser and sizes
        cfg.data.sources, cfg.data.targets, cfg.data.uda_target = ["gtav"], ["cityscapes", "bdd100k", "mapillary"], \
            "cityscapes"
        _paper_domains(cfg, overrides)
        cfg.model = ModelConfig(backbone="resnet101", head="deeplabv2", output_stride=8, pretrained=True,
                                aspp_rates=(6, 12, 18, 24), aux=True, disc_channels=64)
        cfg.data.crop, cfg.data.base_size, cfg.data.scale = (512, 1024), (720, 1280), (1.0, 1.0)
        cfg.data.color_jitter, cfg.data.batch_per_domain = 0.0, 1
        cfg.optim = OptimConfig(lr=2.5e-4, head_lr_mult=10.0, iterations=120000)
        cfg.train = TrainConfig(iterations=120000, eval_every=5000, checkpoint_every=2000, log_every=50)


def apply_overrides(cfg: RunConfig, overrides: dict[str, Any]) -> RunConfig:
    """Return a copy with dotted-path fields replaced; `train.iterations` also sets the LR schedule length."""
    cfg = copy.deepcopy(cfg)
    for path, value in overrides.items():
        obj, *rest = path.split(".")
        if not rest:
            if not hasattr(cfg, obj) or obj in ("model", "optim", "data", "train"):
                raise ValueError(f"unknown config field '{path}'")
            setattr(cfg, obj, value)
            continue
        if obj == "hparams":
            cfg.hparams[rest[0]] = value
            continue
        target = getattr(cfg, obj, None)
        if target is None or not dataclasses.is_dataclass(target) or not hasattr(target, rest[0]):
            raise ValueError(f"unknown config field '{path}'")
        if path == "data.protocol" and isinstance(value, int) and not isinstance(value, bool):
            value = str(value)  # --set data.protocol=16 parses as a number
        setattr(target, rest[0], value)
        if path == "train.iterations":
            cfg.optim.iterations = value
    return validate(cfg)


# ----- validation --------------------------------------------------------------------------------
class ConfigError(ValueError):
    """A config value has the wrong type or is out of range; the message names the field, value and valid range."""


@dataclass(frozen=True)
class Rule:
    """One field's check: `ok(value)` and the valid range in words (for the error message)."""

    ok: Callable[[Any], bool]
    valid: str


def _is_int(v: Any) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)


def _int(lo: int, hi: int | None = None) -> Rule:
    span = f"an integer >= {lo}" if hi is None else f"an integer in [{lo}, {hi}]"
    return Rule(lambda v: _is_int(v) and v >= lo and (hi is None or v <= hi), span)


def _num(lo: float, hi: float | None = None, lo_open: bool = False, hi_open: bool = False) -> Rule:
    upper = "inf)" if hi is None else f"{hi}{')' if hi_open else ']'}"
    span = f"a number in {'(' if lo_open else '['}{lo}, {upper}"

    def ok(v: Any) -> bool:
        return _is_num(v) and (v > lo if lo_open else v >= lo) and (hi is None or (v < hi if hi_open else v <= hi))

    return Rule(ok, span)


def _choice(*values: Any) -> Rule:
    return Rule(lambda v: not isinstance(v, bool) and v in values, f"one of {', '.join(map(repr, values))}")


def _pair(elem: Rule, ordered: bool = False) -> Rule:
    def ok(v: Any) -> bool:
        return (isinstance(v, (list, tuple)) and len(v) == 2 and all(elem.ok(x) for x in v)
                and (not ordered or v[0] <= v[1]))

    return Rule(ok, f"two values [a, b]{' with a <= b' if ordered else ''}, each {elem.valid}")


def _optional(rule: Rule) -> Rule:
    return Rule(lambda v: v is None or rule.ok(v), f"null/None or {rule.valid}")


def _names(min_len: int) -> Rule:
    def ok(v: Any) -> bool:
        return (isinstance(v, (list, tuple)) and len(v) >= min_len and len(set(v)) == len(v)
                and all(isinstance(x, str) and x.strip() == x and x for x in v))

    return Rule(ok, f"a list of {'at least one ' if min_len else ''}distinct dataset names (non-empty strings)")


def _seq(elem: Rule) -> Rule:
    return Rule(lambda v: isinstance(v, (list, tuple)) and len(v) > 0 and all(elem.ok(x) for x in v),
                f"a non-empty list, each {elem.valid}")


def _device_ok(v: Any) -> bool:
    import re

    return isinstance(v, str) and re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", v) is not None


def _city_ok(v: Any) -> bool:
    if v is None:
        return True
    if not isinstance(v, dict) or set(v) != {"train", "val", "size", "seed"}:
        return False
    return (_int(1).ok(v["train"]) and _int(1).ok(v["val"]) and _pair(_int(16)).ok(v["size"])
            and _int(0, 2**63 - 1).ok(v["seed"]))


BOOL = Rule(lambda v: isinstance(v, bool), "true or false")
TEXT = Rule(lambda v: isinstance(v, str) and v != "", "a non-empty string")
SEED = _int(0, 2**63 - 1)

# Every config field and its check; a new field gets a line here (tests/test_reliability.py checks coverage).
CHECKS: dict[str, Rule] = {
    "method": Rule(lambda v: isinstance(v, str) and v in _registry(), "a registered method (dgnb train --help)"),
    "preset": TEXT,
    "seed": SEED,
    "model.backbone": Rule(lambda v: v in _model_names()[0], "a backbone name (resnet_tiny, resnet18, resnet50, ...)"),
    "model.head": Rule(lambda v: v in _model_names()[1], "deeplabv3plus or deeplabv2"),
    "model.output_stride": _choice(8, 16, 32),
    "model.pretrained": BOOL,
    "model.head_channels": _int(1),
    "model.low_proj": _int(1),
    "model.decoder_channels": _optional(_int(1)),
    "model.aspp_rates": _seq(_int(1)),
    "model.aux": BOOL,
    "model.num_classes": _int(1),
    "model.ibn": _choice("none", "a", "b"),
    "model.feature_dropout": Rule(lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v < 1,
                                  "a probability in [0, 1)"),
    "optim.lr": _num(0, lo_open=True),
    "optim.momentum": _num(0, 1, hi_open=True),
    "optim.weight_decay": _num(0),
    "optim.poly_power": _num(0),
    "optim.head_lr_mult": _num(0, lo_open=True),
    "optim.iterations": _int(1),
    "data.root": TEXT,
    "data.sources": _names(1),
    "data.targets": _names(0),
    "data.city": Rule(_city_ok, "null/None or {train: int >= 1, val: int >= 1, size: [H >= 16, W >= 16], "
                                "seed: int >= 0}"),
    "data.crop": _pair(_int(1)),
    "data.base_size": _pair(_int(1)),
    "data.scale": _pair(_num(0, lo_open=True), ordered=True),
    "data.color_jitter": _num(0),
    "data.batch_per_domain": _int(1),
    "data.eval_size": _optional(_pair(_int(1))),
    "data.eval_limit": _optional(_int(1)),
    "data.val_limit": _optional(_int(1)),
    "data.train_limit": _optional(_int(1)),
    "data.eval_batch_size": _int(1),
    "data.num_workers": _int(0),
    "data.cache_images": BOOL,
    "data.protocol": _choice("19", "16", "13"),
    "data.uda_target": _optional(TEXT),
    "data.target_batch": _optional(_int(1)),
    "setting": _choice(*SETTINGS),
    "model.disc_channels": _int(1),
    "train.iterations": _int(1),
    "train.ema_decay": Rule(lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v < 1,
                            "0 (off) or a decay in (0, 1), e.g. 0.995"),
    "train.eval_every": _int(0),
    "train.checkpoint_every": _int(1),
    "train.log_every": _int(1),
    "train.device": Rule(_device_ok, "auto, cpu, cuda, cuda:N or mps"),
    "train.amp": _choice("auto", "off", "bf16", "fp16"),
}


def _registry() -> dict[str, Any]:
    from .methods import REGISTRY

    return REGISTRY


def _model_names() -> tuple[tuple[str, ...], tuple[str, ...]]:
    from .models import BACKBONES, HEADS

    return BACKBONES, HEADS


_FLAGS = {"seed": "--seed N", "method": "--method NAME", "preset": "--preset NAME",
          "train.iterations": "--iterations N", "train.device": "--device auto|cpu|cuda",
          "train.amp": "--amp auto|off|bf16|fp16", "data.root": "--data-root DIR", "data.sources": "--sources A,B",
          "data.targets": "--targets C,D", "setting": "--setting dg|uda", "data.uda_target": "--uda-target NAME"}


def config_fields(cfg: RunConfig) -> dict[str, Any]:
    """Every checked field of `cfg` by dotted path (hparams excluded: the method checks those)."""
    out: dict[str, Any] = {"method": cfg.method, "preset": cfg.preset, "seed": cfg.seed, "setting": cfg.setting}
    for section in ("model", "data", "train", "optim"):  # train.iterations before its copy optim.iterations
        obj = getattr(cfg, section)
        out.update({f"{section}.{f.name}": getattr(obj, f.name) for f in dataclasses.fields(obj)})
    return out


def validate(cfg: RunConfig) -> RunConfig:
    """Check every field's type and range (CHECKS) and the method's hyperparameters; raise ConfigError."""
    for path, value in config_fields(cfg).items():
        rule = CHECKS.get(path)
        if rule is not None and not rule.ok(value):
            raise ConfigError(f"config value {path}={value!r} is invalid: expected {rule.valid}. Fix: "
                              f"{_FLAGS.get(path, f'--set {path}=VALUE')} on the command line, "
                              f"{'preset(name, method, seed=N)' if path == 'seed' else f'{path}=VALUE in preset(...)'}"
                              " in Python.")
    _validate_setting(cfg)
    _validate_hparams(cfg)
    return cfg


class SettingError(ConfigError):
    """A method does not fit the setting (DG or UDA), or the UDA target is missing or misplaced."""


def _validate_setting(cfg: RunConfig) -> None:
    """DG methods refuse the UDA setting; UDA methods need it and a target to adapt to (docs/adaptation.md)."""
    cls = _registry()[cfg.method]
    uda_names = sorted(n for n, c in _registry().items() if "uda" in c.settings)
    target = cfg.data.uda_target
    if cfg.setting not in cls.settings:
        if cfg.setting == "uda":
            raise SettingError(f"method '{cfg.method}' is a domain-generalization method and does not adapt to a "
                               f"target: in the UDA setting use one of {', '.join(uda_names)} (source_only is its "
                               "baseline), or drop --setting uda.")
        raise SettingError(f"method '{cfg.method}' adapts to an unlabelled target: run it in the UDA setting, "
                           "--setting uda --uda-target NAME (Python: preset(name, method, setting='uda')).")
    if cfg.setting == "dg" and target is not None:
        raise SettingError(f"data.uda_target={target!r} is only read in the UDA setting: add --setting uda, or "
                           "remove data.uda_target.")
    if cls.uda and target is None:
        raise SettingError(f"method '{cfg.method}' needs a target to adapt to: give --uda-target NAME "
                           f"(data.uda_target), one of the targets {cfg.data.targets}.")
    if target is not None and target in cfg.data.sources:
        raise SettingError(f"data.uda_target={target!r} is also a labelled source: choose a target that is not in "
                           f"--sources {','.join(cfg.data.sources)}.")
    if target is not None and target not in cfg.data.targets:
        raise SettingError(f"data.uda_target={target!r} is not among the evaluated targets {cfg.data.targets}: add "
                           f"it to --targets (its val split measures the adaptation), or pick one of them.")


def _validate_hparams(cfg: RunConfig) -> None:
    """Unknown names and values whose type differs from the default's (a bool for a bool, a number for a float)."""
    from .methods.base import make_hparams

    defaults = make_hparams(_registry()[cfg.method].Hparams, {}, cfg.method)
    make_hparams(type(defaults), cfg.hparams, cfg.method)  # unknown names: error listing the valid ones
    for name, value in cfg.hparams.items():
        default = getattr(defaults, name)
        if isinstance(default, bool):
            ok, want = isinstance(value, bool), "true or false"
        elif isinstance(default, int):
            ok, want = _is_int(value), "an integer"
        elif isinstance(default, float):
            ok, want = _is_num(value), "a number"
        elif isinstance(default, str):
            ok, want = isinstance(value, str), "a string"
        else:
            ok, want = True, ""
        if not ok:
            raise ConfigError(f"hyperparameter hparams.{name}={value!r} of method '{cfg.method}' is invalid: expected "
                              f"{want} (default {default!r}). Fix it with --set hparams.{name}=VALUE.")
