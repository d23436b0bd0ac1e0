"""The structured job config: dataclasses checked by OmegaConf, plus salmap's own validation.

Every error is a :class:`ConfigError` that names the key and, where it can, the closest valid
name. Nothing here starts Ray.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import MISSING, DictConfig, ListConfig, OmegaConf
from omegaconf.errors import (
    ConfigAttributeError,
    ConfigKeyError,
    ConfigTypeError,
    MissingMandatoryValue,
    OmegaConfBaseException,
    ValidationError,
)

DEFAULT_IMAGE_KEYS = ["jpg", "jpeg", "png", "webp"]
SALIENCY_PNG = ("native", "original", "none")  # run.saliency_png
TARGET_MODES = ("predicted", "label", "all_labels")
LIST_KEYS = ("input.shards", "input.image_keys")
# the column a metric fills is accepted as its config name too
METRIC_ALIASES = {"pointing_hit": "pointing_game", "pseudo_mask_png": "pseudo_mask"}


class ConfigError(ValueError):
    """The config cannot run; the message names the key and the fix."""


@dataclass
class RunSection:
    id: str | None = None  # None: "demo" for the demo, else a timestamp
    output: str = "runs"
    extend: bool = False  # allow new units / new shards under an existing run id
    report: bool = True  # write the HTML report at the end
    shards_per_wave: int = 8  # at most this many shards per commit
    samples_per_wave: int | None = None  # and at most this many samples (where shards.json counts)
    lock_lease_s: float = 120.0  # a lock older than this without a heartbeat is stale
    map_dtype: str = "float16"  # how the saliency column stores maps: float16 or float32
    # the saliency_png preview (pipeline.post): "native" (the map on the photo's frame at the
    # map's own resolution), "original" (at the photo's size), "none"
    saliency_png: str = "native"
    # above this share of error rows in any unit the run exits 5 (0.0: any error row; 1.0: never)
    max_error_rate: float = 0.1


@dataclass
class RaySection:
    address: str | None = None  # None: start a local instance; "auto": join the cluster
    num_cpus: int | None = None
    include_dashboard: bool = False
    dashboard_host: str = "127.0.0.1"
    object_store_memory_mb: int | None = None
    progress: str = "auto"  # auto | bars | lines | off


@dataclass
class InputSection:
    shards: list[str] = field(default_factory=list)
    image_keys: list[str] = field(default_factory=lambda: list(DEFAULT_IMAGE_KEYS))
    label_key: str = "cls"
    boxes_key: str = "json"
    mask_key: str | None = None  # ground-truth label masks, e.g. "seg.png" (label-map quality)
    max_pixels: int = 89_478_485  # decompression-bomb guard (Pillow's default limit)
    # a tar member larger than this is its sample's error row, skipped unread (memory guard)
    max_member_bytes: int = 256 * 2**20


@dataclass
class StorageSection:
    endpoint: str | None = None  # e.g. http://127.0.0.1:9000 for MinIO / moto; None: AWS
    region: str | None = None
    retries: int = 5
    connect_timeout_s: float = 5.0  # per attempt: a dead or unreachable endpoint fails fast
    request_timeout_s: float = 5.0  # per attempt: abandoned when no byte moves for this long


@dataclass
class ModelSection:
    name: str = MISSING
    source: str = MISSING
    weights: str | None = "DEFAULT"
    target_layer: str | None = None
    input_size: int | None = None
    arch: str | None = None  # torchvision architecture for source file:<path>
    reshape: str | None = None  # CAM target layer layout: auto | nchw | nhwc | tokens
    params: dict[str, Any] = field(default_factory=dict)  # package.module:callable's kwargs
    mean: list[float] | None = None  # normalisation override (RGB, images scaled to [0, 1])
    std: list[float] | None = None


@dataclass
class MethodSection:
    name: str = MISSING
    params: dict[str, Any] = field(default_factory=dict)
    batch_size: int | None = None  # overrides resources.batch_size for this method


@dataclass
class ResourcesSection:
    batch_size: int = 16
    actors_per_unit: Any = "auto"  # auto: a cost-aware share of the cluster's slots | an int
    gpus_per_actor: Any = "auto"  # auto | a number (0.5: two actors per GPU)
    cpus_per_actor: float = 1.0
    precision: str = "fp32"  # fp32 | bf16 | fp16 (autocast of forward passes)
    decode_batch_size: int = 32
    max_tasks_in_flight_per_actor: int = 2
    compile: bool = False
    channels_last: bool = True
    units_in_parallel: Any = "auto"  # auto: as many as the slots hold | an int
    share_decode: bool = True  # units of one model share one read + decode (pipeline.shared)
    decode_device: str = "cpu"  # cpu | cuda | auto: where JPEGs are decoded (pipeline.device_decode)


@dataclass
class PseudoLabelsSection:
    """Per-image label maps for weak supervision (workers.metrics.label_maps, .crf)."""

    label_maps: bool = False  # one label-map PNG per image and unit (label_map_png)
    fg_threshold: float = 0.30  # IRN conf_fg_thres: a class above this is foreground
    bg_threshold: float = 0.05  # IRN conf_bg_thres: every class at most this is background
    crf: bool = False  # dense-CRF refinement on the image (needs salmap[crf])
    crf_iterations: int = 10  # IRN crf_inference_label t
    crf_unary: str = "labels"  # labels (IRN, gt_prob) | scores (-log of the scores)
    crf_gt_prob: float = 0.7  # IRN
    crf_gaussian: list[float] = field(default_factory=lambda: [3.0, 3.0])  # sxy, compat
    crf_bilateral: list[float] = field(default_factory=lambda: [50.0, 5.0, 10.0])  # sxy, srgb, compat
    box_iou: float = 0.5  # IoU at which a pseudo box matches a ground-truth box


@dataclass
class SalmapConfig:
    run: RunSection = field(default_factory=RunSection)
    ray: RaySection = field(default_factory=RaySection)
    input: InputSection = field(default_factory=InputSection)
    storage: StorageSection = field(default_factory=StorageSection)
    models: list[ModelSection] = field(default_factory=list)
    methods: list[MethodSection] = field(default_factory=list)
    targets: str = "predicted"
    metrics: list[Any] = field(default_factory=list)
    pseudo_labels: PseudoLabelsSection = field(default_factory=PseudoLabelsSection)
    resources: ResourcesSection = field(default_factory=ResourcesSection)


def _schema_keys(node: Any) -> list[str]:
    return list(node.keys()) if isinstance(node, DictConfig) else []


def _nearest(key: str, options: list[str]) -> str:
    close = difflib.get_close_matches(key, options, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _explain_omegaconf(err: OmegaConfBaseException) -> ConfigError:
    key = getattr(err, "full_key", None) or ""
    msg = str(err).splitlines()[0]
    if isinstance(err, (ConfigKeyError, ConfigAttributeError)):
        bad = key.split(".")[-1] if key else ""
        parent = ".".join(key.split(".")[:-1])
        parent = re.sub(r"\[\d+\]$", "", parent)
        node = OmegaConf.structured(SalmapConfig)
        options: list[str] = _schema_keys(node)
        if parent:
            head = parent.split(".")[0].split("[")[0]
            sub = {
                "models": OmegaConf.structured(ModelSection),
                "methods": OmegaConf.structured(MethodSection),
            }.get(head)
            options = _schema_keys(sub) if sub is not None else _schema_keys(node.get(head))
        return ConfigError(
            f"unknown config key {key!r}{_nearest(bad, options)}; valid keys here: {', '.join(options)}"
        )
    if isinstance(err, MissingMandatoryValue):
        return ConfigError(f"config key {key!r} is required but missing")
    if isinstance(err, (ValidationError, ConfigTypeError)):
        return ConfigError(f"config key {key!r} has the wrong type: {msg}")
    return ConfigError(f"config error at {key!r}: {msg}" if key else f"config error: {msg}")


def read_text(path: str, storage: dict | None = None) -> str:
    """Read a config from a local path or an ``s3://`` URL."""
    if path.startswith("s3://"):
        from .storage import open_filesystem

        fs, inner = open_filesystem(path, storage or {})
        with fs.open_input_stream(inner) as f:
            return f.read().decode("utf-8")
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {path}")
    return p.read_text()


REMOTE_CODE_FLAG = "--allow-remote-code"


def _is_code(source: Any) -> bool:
    """A model source that names code to import and call (``package.module:callable``)."""
    src = str(source or "")
    return bool(re.fullmatch(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*", src)) and not src.startswith(
        ("torchvision:", "file:"))


def _refuse_remote_code(path: str, loaded: DictConfig, cfg: SalmapConfig) -> None:
    """A config read from object storage may not name code to run unless the caller opts in:
    ``package.module:callable`` is imported on the driver while checking the config and
    called on every worker (README, Security)."""
    named = OmegaConf.select(loaded, "models")
    for i, m in enumerate(cfg.models):
        from_file = named[i].get("source") if isinstance(named, ListConfig) and i < len(named) \
            and isinstance(named[i], DictConfig) else None
        if _is_code(m.source) and m.source == from_file:
            raise ConfigError(
                f"models[{i}].source: {m.source!r} names code to import and run, in a config "
                f"read from {path}; a config is code: run it only if you trust whoever can "
                f"write that object, and then pass {REMOTE_CODE_FLAG} (salmap run / sanity) or "
                "allow_remote_code=True (salmap.run, load_config)")


def load_config(path: str | dict | None, overrides: list[str] | None = None,
                allow_remote_code: bool = False) -> SalmapConfig:
    """Merge schema defaults, the YAML file (or a dict of the same keys, read as its JSON
    text would be) and ``key=value`` overrides; validate.

    A config read from ``s3://`` that names custom code (a ``package.module:callable`` model
    source) is refused before anything is imported unless ``allow_remote_code``."""
    overrides = list(overrides or [])
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not key=value (e.g. resources.batch_size=8)")
    schema = OmegaConf.structured(SalmapConfig)
    try:
        parsed = [(k, _parse_value(k, v)) for k, v in (item.split("=", 1) for item in overrides)]
        storage_hint = {k.split(".", 1)[1]: v for k, v in parsed if k.startswith("storage.")}
        merged = schema
        loaded = None
        text = None
        if isinstance(path, dict):  # api.run(dict): no file, the same parse as a JSON file's
            text, path = json.dumps(path), "the config dict"
        if path:
            try:
                loaded = OmegaConf.create(read_text(path, storage_hint) if text is None else text)
            except (OmegaConfBaseException, ConfigError):
                raise
            except Exception as err:  # noqa: BLE001 - YAML syntax errors and the like
                raise ConfigError(f"cannot parse {path}: {err}") from err
            if not isinstance(loaded, DictConfig):
                raise ConfigError(f"{path} must hold a mapping of config keys")
            for key in LIST_KEYS:  # a single string where a list is expected
                if isinstance(OmegaConf.select(loaded, key), str):
                    OmegaConf.update(loaded, key, [OmegaConf.select(loaded, key)])
            methods = loaded.get("methods")
            if isinstance(methods, (str, ListConfig)):  # bare names, like metrics:
                loaded["methods"] = bare_methods(OmegaConf.to_container(methods)
                                                 if isinstance(methods, ListConfig) else methods)
            merged = OmegaConf.merge(schema, loaded)
        for key, value in parsed:
            OmegaConf.update(merged, key, value, merge=True)
        OmegaConf.resolve(merged)
        cfg: SalmapConfig = OmegaConf.to_object(merged)  # type: ignore[assignment]
    except OmegaConfBaseException as err:
        raise _explain_omegaconf(err) from None
    if path and path.startswith("s3://") and loaded is not None and not allow_remote_code:
        _refuse_remote_code(path, loaded, cfg)
    validate(cfg)
    return cfg


def _parse_value(key: str, text: str) -> Any:
    """A dotlist value parsed as OmegaConf does (numbers, booleans, null, [lists])."""
    try:
        value = OmegaConf.to_container(OmegaConf.from_dotlist([f"v={text}"]))["v"]
    except Exception as err:  # noqa: BLE001 - YAML parser errors
        raise ConfigError(
            f"override {key}={text!r} cannot be parsed ({str(err).splitlines()[0]}); "
            "quote list items that contain braces, e.g. 'input.shards=[\"a-{000..009}.tar\"]'"
        ) from None
    if key in LIST_KEYS and isinstance(value, str):
        value = [value]
    if key == "methods":
        value = bare_methods(value)
    return value


def bare_methods(value: Any) -> Any:
    """``methods:`` entries given as bare names (``[gradcam, {name: ig, ...}]``, or one name) as
    ``{name: ...}`` mappings, the way ``metrics:`` takes names."""
    if isinstance(value, str):
        value = [value]
    if isinstance(value, list):
        return [{"name": v} if isinstance(v, str) else v for v in value]
    return value


def parse_targets(spec: str) -> tuple[str, int]:
    """``predicted`` | ``label`` | ``all_labels`` | ``topk:K`` -> (mode, k)."""
    if spec in TARGET_MODES:
        return spec, 1
    m = re.fullmatch(r"topk:(\d+)", spec)
    if m and int(m.group(1)) >= 1:
        return "topk", int(m.group(1))
    raise ConfigError(
        f"targets: {spec!r} is not valid; use predicted, label, all_labels or topk:K (K >= 1)"
        + _nearest(spec, [*TARGET_MODES, "topk:5"])
    )


def metric_specs(cfg: SalmapConfig) -> dict[str, dict]:
    """``metrics:`` entries (``name`` or ``{name: {params}}``) as name -> params."""
    out: dict[str, dict] = {}
    for i, item in enumerate(cfg.metrics):
        if isinstance(item, str):
            out[METRIC_ALIASES.get(item, item)] = {}
        elif isinstance(item, dict) and len(item) == 1:
            name, params = next(iter(item.items()))
            if params is not None and not isinstance(params, dict):
                raise ConfigError(f"metrics[{i}].{name} must map to a dict of parameters")
            out[METRIC_ALIASES.get(str(name), str(name))] = dict(params or {})
        else:
            raise ConfigError(f"metrics[{i}] must be a metric name or {{name: {{params}}}}, got {item!r}")
    return out


def split_metrics(cfg: SalmapConfig) -> tuple[dict[str, dict], dict[str, dict], bool]:
    """(model-side metrics, post-stage metrics, curves wanted) of the config's ``metrics``."""
    return split_metric_specs(metric_specs(cfg))


def split_metric_specs(specs: dict[str, dict]) -> tuple[dict[str, dict], dict[str, dict], bool]:
    """(model-side metrics, post-stage metrics, curves wanted) of ``{name: params}``: the first
    go to the model actors, the second to the post stage, the third asks for curve columns."""
    from salmap.workers.metrics import METRICS

    model, post = {}, {}
    for name, params in specs.items():
        (model if METRICS[name].kind == "model" else post)[name] = params
    curves = any(p.get("curves") for p in {**model, **post}.values())
    return model, post, curves


def validate(cfg: SalmapConfig) -> None:
    """Checks OmegaConf cannot express: names, ranges, combinations."""
    from salmap.workers import methods as method_registry
    from salmap.workers.methods.compat import job_conflict

    if not cfg.models:
        raise ConfigError("models: at least one model is required (e.g. source: efficientnet_lite0)")
    if not cfg.methods:
        raise ConfigError("methods: at least one method is required (e.g. name: gradcam)")
    if not cfg.input.shards:
        raise ConfigError("input.shards: give at least one shard path, glob, brace pattern or s3:// URL")
    seen = set()
    for i, m in enumerate(cfg.models):
        if not re.fullmatch(r"[A-Za-z0-9_.\-]+", m.name):
            raise ConfigError(f"models[{i}].name {m.name!r}: use letters, digits, '_', '-', '.'")
        if m.name in seen:
            raise ConfigError(f"models[{i}].name {m.name!r} appears twice")
        seen.add(m.name)
        _check_model_source(i, m)
    seen = set()
    for i, meth in enumerate(cfg.methods):
        if meth.name not in method_registry.REGISTRY:
            raise ConfigError(f"methods[{i}].name: {method_registry.unknown_name_message(meth.name)}")
        if meth.name in seen:
            raise ConfigError(f"methods[{i}].name {meth.name!r} appears twice")
        seen.add(meth.name)
        try:
            method_registry.check_params(meth.name, dict(meth.params))
        except ValueError as err:
            raise ConfigError(f"methods[{i}].params: {err}") from None
    parse_targets(cfg.targets)
    _check_metrics(cfg)
    _check_pseudo_labels(cfg)
    if conflict := job_conflict(cfg.models, cfg.methods):  # method x model family, from names
        raise ConfigError(conflict)
    r = cfg.resources
    if r.precision not in ("fp32", "bf16", "fp16"):
        raise ConfigError(f"resources.precision: {r.precision!r} is not fp32, bf16 or fp16")
    _check_gpus_per_actor(r.gpus_per_actor)
    if r.decode_device not in ("cpu", "cuda", "auto"):
        raise ConfigError(f"resources.decode_device: {r.decode_device!r} is not cpu, cuda or auto "
                          "(auto: on the actors' GPU when they have one)")
    for key in ("actors_per_unit", "units_in_parallel"):
        value = getattr(r, key)
        if value != "auto" and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ConfigError(f"resources.{key}: {value!r} is not 'auto' or a whole number >= 1")
    for key in ("batch_size", "decode_batch_size", "max_tasks_in_flight_per_actor"):
        if getattr(r, key) < 1:
            raise ConfigError(f"resources.{key} must be >= 1, got {getattr(r, key)}")
    if not r.cpus_per_actor > 0:
        raise ConfigError(f"resources.cpus_per_actor must be > 0 (CPUs each CPU actor reserves, "
                          f"e.g. 1 or 0.5), got {r.cpus_per_actor}")
    if cfg.run.shards_per_wave < 1:
        raise ConfigError("run.shards_per_wave must be >= 1")
    if cfg.run.samples_per_wave is not None and cfg.run.samples_per_wave < 1:
        raise ConfigError("run.samples_per_wave must be >= 1 (or null: no sample cap)")
    if cfg.run.map_dtype not in ("float16", "float32"):
        raise ConfigError(f"run.map_dtype: {cfg.run.map_dtype!r} is not float16 or float32")
    if cfg.run.saliency_png not in SALIENCY_PNG:
        raise ConfigError(f"run.saliency_png: {cfg.run.saliency_png!r} is not one of "
                          f"{', '.join(SALIENCY_PNG)} (native: the map on the photo's frame at its "
                          "own resolution; original: at the photo's size, costlier for large "
                          "photos; none: no PNG, the saliency column only)")
    if not cfg.run.lock_lease_s > 0:
        raise ConfigError(f"run.lock_lease_s must be > 0 (seconds without a heartbeat after "
                          f"which the run's lock is stale, e.g. 120), got {cfg.run.lock_lease_s}")
    if isinstance(cfg.run.max_error_rate, bool) or not 0 <= cfg.run.max_error_rate <= 1:
        raise ConfigError(f"run.max_error_rate must be a share between 0 and 1 (0.1: exit 5 when "
                          f"more than 10 % of a unit's rows are errors; 1: never), got "
                          f"{cfg.run.max_error_rate}")
    if cfg.run.id is not None and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}", cfg.run.id):
        raise ConfigError(f"run.id {cfg.run.id!r}: use letters, digits, '_', '-', '.' (max 128)")
    for key in ("connect_timeout_s", "request_timeout_s"):
        if not getattr(cfg.storage, key) > 0:
            raise ConfigError(f"storage.{key} must be > 0 seconds, got {getattr(cfg.storage, key)}")
    if cfg.storage.retries < 1:
        raise ConfigError(f"storage.retries must be >= 1, got {cfg.storage.retries}")
    if cfg.input.max_pixels < 1:
        raise ConfigError("input.max_pixels must be >= 1")
    if isinstance(cfg.input.max_member_bytes, bool) or not isinstance(
            cfg.input.max_member_bytes, int) or cfg.input.max_member_bytes < 1:
        raise ConfigError(f"input.max_member_bytes must be a whole number of bytes >= 1 (the "
                          f"largest tar member read into memory; default {256 * 2**20}, "
                          f"256 MiB), got {cfg.input.max_member_bytes!r}")
    if cfg.ray.progress not in ("auto", "bars", "lines", "off"):
        raise ConfigError(f"ray.progress: {cfg.ray.progress!r} is not auto, bars, lines or off")


def _check_gpus_per_actor(value: Any) -> None:
    """``auto``, 0 (CPU actors), a fraction of a GPU (actors share it), or whole GPUs."""
    if value == "auto":
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"resources.gpus_per_actor: {value!r} is not 'auto' or a number")
    if value < 0:
        raise ConfigError(f"resources.gpus_per_actor must be 'auto' or a number >= 0 (0: CPU "
                          f"actors, 1: a GPU each, 0.5: two actors per GPU), got {value}")
    if value > 1 and float(value) != int(value):
        raise ConfigError(f"resources.gpus_per_actor: {value} GPUs per actor; above 1 it must be a "
                          "whole number (Ray shares a GPU only in fractions of one)")


def _check_model_source(i: int, m: ModelSection) -> None:
    src = m.source
    callable_source = bool(re.fullmatch(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*", src)) and not (
        src.startswith(("torchvision:", "file:")))
    if m.params and not callable_source:
        raise ConfigError(f"models[{i}].params: only a package.module:callable source takes "
                          f"arguments (source is {src!r})")
    for key in ("mean", "std"):
        value = getattr(m, key)
        if value is not None and (len(value) != 3 or (key == "std" and min(value) <= 0)):
            raise ConfigError(f"models[{i}].{key}: three numbers (R, G, B)"
                              + (", all > 0" if key == "std" else "") + f", got {list(value)}")
    if src.startswith("torchvision:"):
        from salmap.workers.models import torchvision_names

        arch = src.split(":", 1)[1]
        known = torchvision_names()
        if arch not in known:
            raise ConfigError(f"models[{i}].source: unknown torchvision model {arch!r}{_nearest(arch, known)}")
        _check_torchvision_weights(i, arch, m.weights)
    elif src.startswith("file:"):
        if not m.arch:
            raise ConfigError(f"models[{i}].arch: source file:<path> needs the torchvision architecture name")
    elif src in ("efficientnet_lite0", "efficientnet-lite0"):
        pass
    elif re.fullmatch(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*", src):
        _check_factory(i, src)
    else:
        raise ConfigError(
            f"models[{i}].source: {src!r} is not torchvision:<name>, file:<path>, efficientnet_lite0 "
            "or package.module:callable" + _nearest(src, ["efficientnet_lite0", "torchvision:resnet50"])
        )


def _check_factory(i: int, src: str) -> None:
    """Import a ``package.module:callable`` model source now: a typo or a module that is not
    installed is a config error before Ray starts, not an actor that dies on every node."""
    import importlib

    module_name, fn_name = src.split(":", 1)
    where = ("it must be importable on the driver and on every Ray node (on PYTHONPATH or in "
             "an installed package)")
    try:
        module = importlib.import_module(module_name)
    except Exception as err:  # noqa: BLE001 - any import-time failure of the user's module
        raise ConfigError(f"models[{i}].source: cannot import module {module_name!r} "
                          f"({type(err).__name__}: {err}); {where}") from None
    factory = getattr(module, fn_name, None)
    if factory is None:
        raise ConfigError(f"models[{i}].source: module {module_name!r} has no {fn_name!r}"
                          f"{_nearest(fn_name, [n for n in dir(module) if not n.startswith('_')])}")
    if not callable(factory):
        raise ConfigError(f"models[{i}].source: {src} is a {type(factory).__name__}, not a "
                          "callable that returns a torch.nn.Module")


def _check_metrics(cfg: SalmapConfig) -> None:
    try:
        from salmap.workers.metrics import METRICS
    except ImportError:  # the metrics library is optional at this stage
        METRICS = {}
    specs = metric_specs(cfg)
    for name in specs:
        if METRICS and name not in METRICS:
            raise ConfigError(f"metrics: unknown metric {name!r}{_nearest(name, list(METRICS))}; "
                              f"known: {', '.join(METRICS)}")
    if METRICS:
        from salmap.workers.metrics import check_params

        try:
            check_params(specs)
        except ValueError as err:
            raise ConfigError(f"metrics: {err}") from None


def _check_pseudo_labels(cfg: SalmapConfig) -> None:
    p = cfg.pseudo_labels
    if not 0 <= p.bg_threshold <= p.fg_threshold < 1:
        raise ConfigError(f"pseudo_labels: need 0 <= bg_threshold <= fg_threshold < 1, got "
                          f"bg_threshold={p.bg_threshold}, fg_threshold={p.fg_threshold}")
    if not 0 < p.box_iou <= 1:
        raise ConfigError(f"pseudo_labels.box_iou must be in (0, 1], got {p.box_iou}")
    if cfg.input.mask_key and not p.label_maps:
        raise ConfigError(f"input.mask_key={cfg.input.mask_key!r}: ground-truth masks score the "
                          "label maps; set pseudo_labels.label_maps=true (or drop mask_key)")
    if not p.crf:
        return
    if not p.label_maps:
        raise ConfigError("pseudo_labels.crf refines the label maps; set pseudo_labels.label_maps=true")
    if p.crf_unary not in ("labels", "scores"):
        raise ConfigError(f"pseudo_labels.crf_unary: {p.crf_unary!r} is not labels or scores"
                          + _nearest(p.crf_unary, ["labels", "scores"]))
    if p.crf_iterations < 1:
        raise ConfigError("pseudo_labels.crf_iterations must be >= 1")
    if not 0 < p.crf_gt_prob < 1:
        raise ConfigError(f"pseudo_labels.crf_gt_prob must be in (0, 1), got {p.crf_gt_prob}")
    if len(p.crf_gaussian) != 2 or len(p.crf_bilateral) != 3:
        raise ConfigError("pseudo_labels.crf_gaussian is [sxy, compat] and crf_bilateral "
                          "[sxy, srgb, compat]")
    from salmap.workers.metrics.crf import INSTALL_HINT, available

    if not available():
        raise ConfigError(INSTALL_HINT)


def pseudo_label_options(cfg: SalmapConfig) -> dict[str, Any]:
    """The ``pseudo_labels`` section as the post stage reads it (plain data)."""
    p = cfg.pseudo_labels
    crf = {"iterations": p.crf_iterations, "unary": p.crf_unary, "gt_prob": p.crf_gt_prob,
           "gaussian": [float(v) for v in p.crf_gaussian],
           "bilateral": [float(v) for v in p.crf_bilateral]} if p.crf else None
    return {"label_maps": p.label_maps, "fg_threshold": p.fg_threshold,
            "bg_threshold": p.bg_threshold, "crf": crf, "box_iou": p.box_iou,
            "max_pixels": cfg.input.max_pixels}


def to_container(cfg: SalmapConfig) -> dict:
    """The config as plain dicts and lists (resolved), as the manifest stores it."""
    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)  # type: ignore[return-value]


def to_yaml(cfg: SalmapConfig) -> str:
    """The config as YAML text."""
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def stable_hash(obj: Any) -> str:
    """A short hash of ``obj``'s JSON (sorted keys): equal settings, equal hash, across processes."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _check_torchvision_weights(i: int, arch: str, weights: str | None) -> None:
    if weights in (None, "", "none", "None", "DEFAULT"):
        return
    import torchvision.models as tvm

    try:
        members = list(tvm.get_model_weights(arch).__members__)
    except (ValueError, KeyError):  # an architecture without published weights
        members = []
    if weights not in members:
        options = list(dict.fromkeys(["DEFAULT", *members, "none"]))
        raise ConfigError(f"models[{i}].weights: {weights!r} is not a weights name of {arch}; "
                          f"use one of {', '.join(options)}{_nearest(weights, options)}")


def unit_hash(cfg: SalmapConfig, model: ModelSection, method: MethodSection) -> str:
    """What makes a unit's rows what they are (not batch sizes, actor counts or paths)."""
    c = to_container(cfg)
    what = {
        "model": {k: v for k, v in to_container_section(model).items()},
        "method": {"name": method.name, "params": dict(method.params)},
        "targets": cfg.targets,
        "metrics": c["metrics"],
        "precision": cfg.resources.precision,
        "map_dtype": cfg.run.map_dtype,
        "input": {k: c["input"][k] for k in ("image_keys", "label_key", "boxes_key", "max_pixels")},
    }
    # only where they differ from the defaults, so runs made without them keep their hash
    if c["input"]["mask_key"]:
        what["input"]["mask_key"] = c["input"]["mask_key"]
    # PNGs at the photo's size are what runs made before this key hold: those keep their hash
    if cfg.run.saliency_png != "original":
        what["saliency_png"] = cfg.run.saliency_png
    if c["pseudo_labels"] != to_container_section(PseudoLabelsSection()):
        what["pseudo_labels"] = c["pseudo_labels"]
    return stable_hash(what)


def to_container_section(section: Any) -> dict:
    """One config section as a plain dict (resolved)."""
    return OmegaConf.to_container(OmegaConf.structured(section), resolve=True)  # type: ignore[return-value]


def is_list(x: Any) -> bool:
    """A list in any of the forms a config may hold one (list, tuple, OmegaConf ListConfig)."""
    return isinstance(x, (list, tuple, ListConfig))
