"""``dqk run``: features → bins → subset (→ export) (→ patches) in a work directory, resumably.

The options of a run — YAML keys, ``dqk run`` flags and :class:`PipelineConfig` fields — are
checked by one table of click parameter types (:data:`CONFIG_TYPES`): the flags are declared
with these types, and a YAML file or a config built in Python is converted through the same
ones, so a value is accepted or refused the same way wherever it comes from. The whole config
is checked before the first stage runs.

Resumability (docs/method.md §7). Each stage's fingerprint is the sha256 of a document holding
its options, its upstream stage's fingerprint and the fingerprints of what it reads: sha256 of
the content of files read whole (feature and label files, bins, subsets, checkpoints, every file
of a text model directory, a text or image-array input), and for an image folder the sorted
(path, size, mtime in ns) of its images — or, with ``verify_inputs``, their content. The run
record ``WORK_DIR/run.json`` keeps per stage its fingerprint and the sha256 of each output as
it was written. A stage is reused only when its fingerprint is unchanged, its outputs still
hash to what was recorded and no stage it reads from ran in this run.
"""

from __future__ import annotations

import json
import numbers
import os
import re
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Callable, Mapping, Optional

import click

from dqkernels.core.atomic import staged_directory, write_json
from dqkernels.core.errors import InputError
from dqkernels.core.fingerprint import (
    fingerprint_document,
    fingerprint_file,
    fingerprint_file_contents,
    fingerprint_file_listing,
    fingerprint_tree,
)
from dqkernels.core.paths import refuse_overlap
from dqkernels.features.image import FEATURE_MODES, GRAD_DELTAS
from dqkernels.formats.bins import bin_sizes_summary
from dqkernels.formats.feature_set import SIDECAR_NAME
from dqkernels.formats.inputs import input_kind
from dqkernels.formats.subset import load_subset_indices, manifest_path, read_manifest
from dqkernels.graphcut.api import BACKENDS, METRICS
from dqkernels.pipeline.export import check_export_destination, export_subset
from dqkernels.pipeline.progress import as_reporter
from dqkernels.pipeline.stages import (
    SAMPLING_METHODS,
    draw_subset,
    extract_features,
    make_bins,
    save_subset,
)
from dqkernels.sampling.sample import ALLOCATIONS

RUN_RECORD = "run.json"
CAM_RANDOM_INIT_WARNING = (
    "WARNING: patches scored by a random-init GradCAM++ network (no cam_checkpoint): the kept patches "
    "follow a random network"
)
RUN_FORMAT = "dqkernels.run"
BIN_SIZE_RULES = ("split", "official")


class DeviceType(click.ParamType):
    """A torch device name: cpu, cuda or cuda:N."""

    name = "device"

    def convert(self, value, param, ctx):
        if value is None or re.fullmatch(r"cpu|cuda(:\d+)?", str(value)):
            return value
        self.fail(f"{value!r} is not a device (cpu, cuda or cuda:N)", param, ctx)


DEVICE = DeviceType()

# What every option of a run accepts. ``dqk run`` declares its flags with these types, and YAML
# values and PipelineConfig fields go through them too (:func:`check_config_values`).
CONFIG_TYPES: dict[str, click.ParamType] = {
    "input": click.Path(exists=True),
    "work_dir": click.Path(file_okay=False),
    "model": click.STRING,
    "checkpoint": click.Path(exists=True, dir_okay=False),
    "pretrained": click.BOOL,
    "weights_file": click.Path(exists=True, dir_okay=False),
    "random_init": click.BOOL,
    "mode": click.Choice(FEATURE_MODES),
    "grad_delta": click.Choice(GRAD_DELTAS),
    "text_model": click.Path(exists=True, file_okay=False),
    "text_fields": click.STRING,
    "num_classes": click.IntRange(min=1),
    "device": DEVICE,
    "img_size": click.IntRange(min=8),
    "batch_size": click.IntRange(min=1),
    "workers": click.IntRange(min=0),
    "strict": click.BOOL,
    "feature_seed": click.IntRange(min=0),
    "verify_inputs": click.BOOL,
    "bins": click.IntRange(min=1),
    "per_class": click.BOOL,
    "metric": click.Choice(METRICS),
    "lam": click.FloatRange(min=0, min_open=True),
    "bin_device": DEVICE,
    "backend": click.Choice(BACKENDS),
    "sizes": click.Choice(BIN_SIZE_RULES),
    "ratio": click.FloatRange(0, 1, min_open=True),
    "seed": click.IntRange(min=0),
    "allocation": click.Choice(ALLOCATIONS),
    "method": click.Choice(SAMPLING_METHODS),
    "export": click.Path(),
    "link": click.BOOL,
    "drop": click.FloatRange(0, 1, max_open=True),
    "quantize_img_size": click.IntRange(min=1),
    "quantize_grid": click.IntRange(min=1),
    "cam_model": click.STRING,
    "cam_checkpoint": click.Path(exists=True, dir_okay=False),
}


@dataclass
class PipelineConfig:
    """Everything ``dqk run`` needs; YAML keys and ``dqk run`` options have these names.

    Paths in a YAML file are relative to the file's directory. Each field accepts what its
    entry of :data:`CONFIG_TYPES` accepts; None stands for "not given" only where the default
    is None.
    """

    input: Optional[str] = None
    work_dir: Optional[str] = None
    # features
    model: str = "resnet18"
    checkpoint: Optional[str] = None
    pretrained: bool = False
    weights_file: Optional[str] = None
    random_init: bool = False
    mode: str = "pooled"
    grad_delta: str = "standard"
    text_model: Optional[str] = None
    text_fields: str = "auto"
    num_classes: Optional[int] = None
    device: Optional[str] = None
    img_size: Optional[int] = None
    batch_size: int = 64
    workers: int = 0
    strict: bool = False
    feature_seed: int = 0
    verify_inputs: bool = False
    # bins
    bins: int = 10
    per_class: bool = True
    metric: str = "cosine"
    lam: float = 1.0
    bin_device: Optional[str] = None
    backend: str = "auto"
    sizes: str = "split"
    # sample
    ratio: float = 0.1
    seed: int = 0
    allocation: str = "exact"
    method: str = "dq"
    # export
    export: Optional[str] = None
    link: bool = False
    # pixel quantization of the subset (images only; off unless ``drop`` is set)
    drop: Optional[float] = None
    quantize_img_size: int = 224
    quantize_grid: int = 14
    cam_model: str = "resnet18"
    cam_checkpoint: Optional[str] = None

    PATH_KEYS = ("input", "work_dir", "checkpoint", "weights_file", "text_model", "export", "cam_checkpoint")

    @classmethod
    def from_yaml(cls, path: str | os.PathLike) -> "PipelineConfig":
        """Read and check a flat YAML mapping of the field names (dashes or underscores).

        Every value is converted by its field's click type (:func:`check_config_values`):
        booleans must be YAML booleans, numbers YAML numbers, text and paths YAML strings.
        Unknown keys are refused. Raises InputError naming the file and the key.
        """
        import yaml

        path = Path(path)
        try:
            document = yaml.safe_load(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, RecursionError, yaml.YAMLError) as error:
            reason = "nested too deeply" if isinstance(error, RecursionError) else str(error).strip()
            first_line = (reason.splitlines() or [type(error).__name__])[0]
            raise InputError(f"cannot read config {str(path)!r}: {first_line}") from None
        if document is None:
            document = {}
        if not isinstance(document, dict):
            raise InputError(f"config {str(path)!r} must be a mapping of option names to values")
        known = {f.name for f in fields(cls)}
        values = {}
        for key, value in document.items():
            name = str(key).replace("-", "_")
            if name not in known:
                raise InputError(
                    f"config {str(path)!r}: unknown key {key!r} (known: {', '.join(sorted(known))})"
                )
            if name in values:
                raise InputError(f"config {str(path)!r}: {name!r} is given twice")
            if name in cls.PATH_KEYS and isinstance(value, str):
                value = str((path.parent / value).resolve())
            values[name] = value
        return cls(**check_config_values(values, f"config {str(path)!r}"))

    def checked(self, origin: str = "config") -> "PipelineConfig":
        """A copy with every field converted by :data:`CONFIG_TYPES`; InputError naming the first bad one."""
        return replace(self, **check_config_values(asdict(self), origin))


_DEFAULTS = {f.name: f.default for f in fields(PipelineConfig)}


def _expected_kind(param_type: click.ParamType) -> tuple[str, Callable[[object], bool]]:
    """What a config value must be before its click type converts it: (description, test)."""
    if isinstance(param_type, click.types.BoolParamType):
        return "true or false", lambda value: isinstance(value, bool)
    if isinstance(param_type, click.types.IntParamType):
        return "an integer", lambda value: isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if isinstance(param_type, click.types.FloatParamType):
        return "a number", lambda value: isinstance(value, numbers.Real) and not isinstance(value, bool)
    if isinstance(param_type, click.Path):
        return "a path", lambda value: isinstance(value, (str, os.PathLike))
    return "a string", lambda value: isinstance(value, str)


def check_config_values(values: Mapping[str, object], origin: str) -> dict:
    """Convert config values through their click types (:data:`CONFIG_TYPES`).

    values: {field name: value} as read from YAML or set in Python. A value must already have
    the right kind (no string is turned into a boolean or a number); it is then converted and
    range-checked exactly as the ``dqk run`` flag of that name would be. None is accepted where
    the field's default is None. Returns the converted values (paths as strings).
    Raises InputError "<origin>: <key> ..." for the first bad value.
    """
    converted = {}
    for name, value in values.items():
        param_type = CONFIG_TYPES[name]
        if value is None:
            if _DEFAULTS[name] is not None:
                raise InputError(f"{origin}: {name} needs a value (default {_DEFAULTS[name]!r})")
            converted[name] = None
            continue
        description, has_kind = _expected_kind(param_type)
        if not has_kind(value):
            raise InputError(f"{origin}: {name} must be {description}, got {value!r}")
        try:
            value = param_type.convert(value, None, None)
        except click.BadParameter as error:
            raise InputError(f"{origin}: {name}: {error.message}") from None
        converted[name] = os.fspath(value) if isinstance(param_type, click.Path) else value
    return converted


# --------------------------------------------------------------------------- the run record


@dataclass
class _Layout:
    """Where a run reads and writes: resolved input, work directory and every output path."""

    input: Path
    kind: str
    work_dir: Path
    features: Path
    bins: Path
    subset: Path
    record: Path
    export: Optional[Path]
    patches: Path

    def outputs(self, config: PipelineConfig) -> dict:
        """{name: path} of everything the run may write (for :func:`refuse_overlap`)."""
        outputs = {
            "work_dir": self.work_dir,
            "the features folder": self.features,
            "the bins file": self.bins,
            "the subset file": self.subset,
            "the subset manifest": manifest_path(self.subset),
            "the run record": self.record,
            "export": self.export,
        }
        if config.drop is not None:
            outputs["the patch store"] = self.patches
        return outputs


def _read_record(path: Path) -> dict:
    """{stage: entry} from the run record; empty when there is none or it is unreadable
    (a record that cannot be trusted only makes every stage run again)."""
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError):
        return {}
    stages = document.get("stages") if isinstance(document, dict) else None
    if not isinstance(stages, dict):
        return {}
    return {name: entry for name, entry in stages.items() if isinstance(entry, dict)}


def _write_record(layout: _Layout, stages: dict) -> None:
    write_json(layout.record, {"format": RUN_FORMAT, "stages": stages})


def _output_name(layout: _Layout, path: Path) -> str:
    """How the record names an output: relative to the work directory when inside it."""
    return os.path.relpath(path, layout.work_dir) if layout.work_dir in path.parents else str(path)


def _digest(path: Path, content: bool) -> Optional[str]:
    """sha256 of a file's content or fingerprint of a directory tree; None when it is missing."""
    if path.is_dir():
        return fingerprint_tree(path, content=content)
    if path.is_file():
        return fingerprint_file(path)
    return None


def _output_digests(layout: _Layout, paths: list[Path], content: bool = True) -> dict:
    return {_output_name(layout, path): _digest(path, content) for path in paths}


def _outputs_unchanged(layout: _Layout, entry: dict, content: bool = True) -> bool:
    """True when every output the entry records still has the recorded digest."""
    recorded = entry.get("outputs")
    if not isinstance(recorded, dict) or not recorded:
        return False
    for name, digest in recorded.items():
        path = Path(name) if os.path.isabs(name) else layout.work_dir / name
        if digest is None or _digest(path, content) != digest:
            return False
    return True


# --------------------------------------------------------------------------- checks before any stage


def _input_fingerprints(layout: _Layout, verify: bool) -> tuple[str, Optional[str]]:
    """(fingerprint used in the features stage's fingerprint, content fingerprint or None).

    Files are read whole: their content hash serves as both. An image folder: the listing of
    (path, size, mtime_ns); with ``verify`` also the content of every image.
    """
    if layout.kind != "image-folder":
        digest = fingerprint_file(layout.input)
        return digest, digest
    from dqkernels.formats.items import list_image_folder

    relative_paths = list_image_folder(layout.input).relative_paths
    listing = fingerprint_file_listing(layout.input, relative_paths)
    return listing, fingerprint_file_contents(layout.input, relative_paths) if verify else None


def _check_run(config: PipelineConfig, record: dict, layout: _Layout, inputs: Mapping) -> None:
    """Everything that can be checked before the first stage: that no output is an input, option
    combinations, model names, devices and the export destination."""
    refuse_overlap(
        {
            "input": layout.input,
            "checkpoint": config.checkpoint,
            "weights_file": config.weights_file,
            "text_model": config.text_model if layout.kind == "text" else None,
            "cam_checkpoint": config.cam_checkpoint if config.drop is not None else None,
            **inputs,
        },
        layout.outputs(config),
        folders={"the features folder", "export", "the patch store"},
    )
    if layout.kind == "text":
        if config.mode != "pooled":
            raise InputError("mode: instruction data supports mode 'pooled' only (gradient mode needs labelled images)")
        from dqkernels.features.text import parse_text_fields, resolve_text_model

        resolve_text_model(config.text_model)
        parse_text_fields(config.text_fields)
        if config.drop is not None:
            raise InputError("drop: pixel quantization needs images, the input is text")
    else:
        from dqkernels.features.image import check_model_name

        check_model_name(config.model)
    if config.grad_delta != "standard" and config.mode != "gradient":
        raise InputError("grad_delta applies to mode 'gradient' only")
    if config.drop is not None:
        from dqkernels.features.image import check_model_name
        from dqkernels.pixel.gradcam import CAM_IMAGE_SIZE, keep_count

        grid, size = config.quantize_grid, config.quantize_img_size
        if CAM_IMAGE_SIZE % grid:
            raise InputError(f"quantize_grid must divide {CAM_IMAGE_SIZE}, got {grid}")
        if size % grid:
            raise InputError(f"quantize_img_size must be a multiple of quantize_grid ({grid}), got {size}")
        keep_count(grid * grid, config.drop)
        check_model_name(config.cam_model)
    if config.device is not None or config.bin_device is not None:
        from dqkernels.features.image import resolve_device

        for device in (config.device, config.bin_device):
            if device is not None:
                resolve_device(device)
    if layout.export is not None and layout.export.exists():
        own_export = record.get("export", {}).get("dir")
        if own_export != str(layout.export):
            check_export_destination(layout.export)
    if layout.kind != "text":
        from dqkernels.features.image import weights_source

        try:
            weights_source(config.pretrained, config.weights_file, config.checkpoint, config.random_init)
        except InputError as error:
            raise InputError(f"{error} (in a config: pretrained: true [weights_file: PATH], checkpoint: PATH, "
                             "or random_init: true)") from None


# --------------------------------------------------------------------------- the run


def run_pipeline(
    config: PipelineConfig,
    log: Callable[[str], None] = print,
    progress: bool = False,
    inputs: Optional[Mapping[str, Optional[str | os.PathLike]]] = None,
) -> dict:
    """Features → bins → subset (→ export) (→ patch store) in ``config.work_dir``, reusing
    finished stages (see the module docstring for when a stage is reused).

    inputs: further files the run reads, {name: path} (e.g. its config file), which no output
    may overwrite. progress: report the long steps on stderr (:mod:`dqkernels.pipeline.progress`).
    The whole config is checked before the first stage runs; a bad value raises InputError and
    nothing is written. Returns the output path of each stage.
    """
    config = config.checked()
    if config.input is None:
        raise InputError("run needs an input (--input or 'input:' in the config)")
    if config.work_dir is None:
        raise InputError("run needs a work directory (--work-dir or 'work_dir:' in the config)")
    input_path = Path(config.input).resolve()
    work_dir = Path(os.path.abspath(config.work_dir))
    layout = _Layout(
        input=input_path,
        kind=input_kind(input_path),
        work_dir=work_dir,
        features=work_dir / "features",
        bins=work_dir / "bins.npz",
        subset=work_dir / "subset.npy",
        record=work_dir / RUN_RECORD,
        export=Path(config.export).resolve() if config.export is not None else None,
        patches=work_dir / "patches",
    )
    record = _read_record(layout.record)
    _check_run(config, record, layout, inputs or {})
    options = asdict(config)
    ran: dict = {}

    def finish(stage: str, entry: dict) -> None:
        record[stage] = entry
        ran[stage] = True
        _write_record(layout, record)

    # ------------------------------------------------------------------ features
    input_fp, input_content_fp = _input_fingerprints(layout, config.verify_inputs)
    text_model = None
    if layout.kind == "text":
        from dqkernels.features.text import resolve_text_model

        text_model = str(resolve_text_model(config.text_model))
    features_fp = fingerprint_document(
        {
            "stage": "features",
            "input": {"path": str(input_path), "kind": layout.kind, "fingerprint": input_fp},
            "checkpoint": fingerprint_file(config.checkpoint) if config.checkpoint else None,
            "weights_file": fingerprint_file(config.weights_file) if config.weights_file else None,
            "text_model": fingerprint_tree(text_model, content=True) if layout.kind == "text" else None,
            **{key: options[key] for key in (
                "model", "mode", "grad_delta", "num_classes", "img_size", "device", "strict", "feature_seed",
                "pretrained", "random_init", "text_fields",
            )},
        }
    )
    entry = record.get("features", {})
    reusable = (
        entry.get("fingerprint") == features_fp
        and (not config.verify_inputs or entry.get("input_content") == input_content_fp)
        and _outputs_unchanged(layout, entry)
    )
    random_warning = ""
    if layout.kind != "text" and config.random_init:
        from dqkernels.features.image import RANDOM_INIT_WARNING

        random_warning = f" | {RANDOM_INIT_WARNING}"
    if reusable:
        log(f"features: reused {layout.features}{random_warning}")
    else:
        started = time.perf_counter()
        layout.work_dir.mkdir(parents=True, exist_ok=True)
        sidecar = extract_features(
            input_path, layout.features, model=config.model, checkpoint=config.checkpoint, mode=config.mode,
            grad_delta=config.grad_delta, text_model=text_model, num_classes=config.num_classes,
            pretrained=config.pretrained, weights_file=config.weights_file, random_init=config.random_init,
            text_fields=config.text_fields,
            img_size=config.img_size, batch_size=config.batch_size, device=config.device,
            workers=config.workers, strict=config.strict, seed=config.feature_seed, progress=progress,
            stage_fingerprint=features_fp,
        )
        written = [layout.features / SIDECAR_NAME, *(layout.features / name for name in sidecar["files"].values())]
        finish("features", {"fingerprint": features_fp, "input_content": input_content_fp,
                            "outputs": _output_digests(layout, written)})
        log(f"features: wrote {layout.features} ({sidecar['count']} samples, "
            f"{time.perf_counter() - started:.1f} s){random_warning}")
    features_outputs = record["features"]["outputs"]

    # ------------------------------------------------------------------ bins
    bins_fp = fingerprint_document(
        {
            "stage": "bins",
            "features": features_fp,
            "files": features_outputs,
            **{key: options[key] for key in ("bins", "per_class", "metric", "lam", "bin_device", "backend", "sizes")},
        }
    )
    if _reusable(layout, record, "bins", bins_fp, ran, upstream="features"):
        log(f"bins: reused {layout.bins}")
    else:
        outcome = make_bins(
            layout.features, config.bins, out=layout.bins, use_labels=config.per_class, metric=config.metric,
            lam=config.lam, device=config.bin_device, backend=config.backend, sizes=config.sizes,
            stage_fingerprint=bins_fp, progress=progress,
        )
        finish("bins", {"fingerprint": bins_fp, "outputs": _output_digests(layout, [layout.bins])})
        log(f"bins: wrote {layout.bins} (backend {outcome.result.backend}, {outcome.seconds:.2f} s, "
            f"sizes {bin_sizes_summary(outcome.result.bin_sizes)})")

    # ------------------------------------------------------------------ sample
    subset_fp = fingerprint_document(
        {
            "stage": "subset",
            "bins": bins_fp,
            "files": record["bins"]["outputs"],
            **{key: options[key] for key in ("ratio", "seed", "allocation", "method")},
        }
    )
    if _reusable(layout, record, "subset", subset_fp, ran, upstream="bins"):
        log(f"sample: reused {layout.subset}")
    else:
        subset = draw_subset(
            layout.bins, config.ratio, seed=config.seed, allocation=config.allocation, method=config.method,
            stage_fingerprint=subset_fp,
        )
        save_subset(subset, layout.bins, layout.subset)
        finish("subset", {"fingerprint": subset_fp,
                          "outputs": _output_digests(layout, [layout.subset, manifest_path(layout.subset)])})
        log(f"sample: wrote {layout.subset} ({len(subset.indices)} samples)")

    outputs = {"features": layout.features, "bins": layout.bins, "subset": layout.subset}
    reads_after_subset = {
        "subset": subset_fp,
        "files": record["subset"]["outputs"],
        "features": features_outputs,
        "input": input_fp,
    }
    if layout.export is not None:
        outputs["export"] = _export_stage(config, layout, record, ran, reads_after_subset, log, finish, progress)
    if config.drop is not None:
        outputs["patches"] = _quantize_stage(config, layout, record, ran, reads_after_subset, log, progress, finish)
    return outputs


def _reusable(layout: _Layout, record: dict, stage: str, fingerprint: str, ran: dict, upstream: str,
              content: bool = True) -> bool:
    """A stage is reused when the stage it reads from did not run now, its recorded fingerprint
    is ``fingerprint`` and its outputs are as recorded."""
    entry = record.get(stage, {})
    return (
        not ran.get(upstream)
        and entry.get("fingerprint") == fingerprint
        and _outputs_unchanged(layout, entry, content)
    )


def _export_stage(config: PipelineConfig, layout: _Layout, record: dict, ran: dict, reads: dict,
                  log: Callable[[str], None], finish: Callable[[str, dict], None], progress: bool = False) -> Path:
    """The export stage: the subset in the input's format at ``config.export``. Its outputs are
    checked by listing (path, size, mtime_ns, link targets): an export is as large as its work."""
    export_fp = fingerprint_document({"stage": "export", **reads, "dir": str(layout.export), "link": config.link})
    if _reusable(layout, record, "export", export_fp, ran, upstream="subset", content=False):
        log(f"export: reused {layout.export}")
        return layout.export
    # Recorded before writing, so that a run killed while exporting may replace its own export.
    own_export = record.get("export", {}).get("dir") == str(layout.export)
    record["export"] = {"dir": str(layout.export)}
    _write_record(layout, record)
    export_subset(
        load_subset_indices(layout.subset),
        layout.export,
        features_sidecar=read_manifest(layout.subset).get("features_sidecar"),
        link=config.link,
        replace=own_export,
        bins_file=layout.bins,
        progress=progress,
    )
    finish("export", {"dir": str(layout.export), "fingerprint": export_fp,
                      "outputs": _output_digests(layout, [layout.export], content=False)})
    log(f"export: wrote {layout.export}")
    return layout.export


def _quantize_stage(config: PipelineConfig, layout: _Layout, record: dict, ran: dict, reads: dict,
                    log: Callable[[str], None], progress: bool, finish: Callable[[str, dict], None]) -> Path:
    """The pixel-quantization stage: GradCAM++ patch store of the subset in WORK_DIR/patches,
    built beside it and swapped in whole."""
    from dqkernels.pixel.gradcam import quantize_images

    options = {key: getattr(config, key) for key in (
        "drop", "quantize_img_size", "quantize_grid", "cam_model", "feature_seed")}
    quantize_fp = fingerprint_document({
        "stage": "patches", **reads, **options,
        "cam_checkpoint": fingerprint_file(config.cam_checkpoint) if config.cam_checkpoint else None,
    })
    if _reusable(layout, record, "patches", quantize_fp, ran, upstream="subset"):
        log(f"quantize: reused {layout.patches}")
        return layout.patches
    started = time.perf_counter()
    with staged_directory(layout.patches) as staging, as_reporter(progress).step("quantize", unit="images") as stored:
        outcome = quantize_images(
            layout.input, staging, subset=layout.subset, drop=config.drop,
            img_size=config.quantize_img_size, grid=config.quantize_grid, cam_model=config.cam_model,
            cam_checkpoint=config.cam_checkpoint, batch_size=config.batch_size, device=config.device,
            workers=config.workers, seed=config.feature_seed, progress=stored if progress else None,
        )
    finish("patches", {"fingerprint": quantize_fp, "outputs": _output_digests(layout, [layout.patches])})
    log(f"quantize: wrote {layout.patches} ({outcome.count} images, {outcome.kept} of "
        f"{outcome.num_patches} patches kept, {outcome.image_bytes} -> {outcome.store_bytes} bytes, "
        f"{time.perf_counter() - started:.1f} s)" + (f" | {CAM_RANDOM_INIT_WARNING}" if config.cam_checkpoint is None else ""))
    return layout.patches
