"""``dqk run``: features → bins → subset (→ export) (→ patches) in a work directory, resumably."""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Callable, Optional

from dqkernels.core.atomic import write_json
from dqkernels.core.errors import InputError
from dqkernels.core.fingerprint import (
    fingerprint_arrays,
    fingerprint_document,
    fingerprint_file,
    fingerprint_file_listing,
)
from dqkernels.formats.bins import bin_sizes_summary, load_bins_file
from dqkernels.formats.feature_set import SIDECAR_NAME
from dqkernels.formats.inputs import input_kind
from dqkernels.formats.subset import load_subset_indices, read_manifest
from dqkernels.pipeline.export import export_subset
from dqkernels.pipeline.stages import (
    draw_subset,
    extract_features,
    make_bins,
    save_subset,
)


@dataclass
class PipelineConfig:
    """Everything ``dqk run`` needs; YAML keys and ``dqk run`` options have these names.

    Paths in a YAML file are relative to the file's directory.
    """

    input: Optional[str] = None
    work_dir: Optional[str] = None
    # features
    model: str = "resnet18"
    checkpoint: Optional[str] = None
    mode: str = "pooled"
    grad_delta: str = "standard"
    text_model: Optional[str] = None
    num_classes: Optional[int] = None
    device: Optional[str] = None
    img_size: Optional[int] = None
    batch_size: int = 64
    workers: int = 0
    strict: bool = False
    feature_seed: int = 0
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
    # export
    export: Optional[str] = None
    link: bool = False
    # pixel quantization of the subset (images only; off unless ``drop`` is set)
    drop: Optional[float] = None
    quantize_img_size: int = 224
    quantize_grid: int = 14
    cam_model: str = "resnet18"
    cam_checkpoint: Optional[str] = None

    PATH_KEYS = ("input", "work_dir", "checkpoint", "text_model", "export", "cam_checkpoint")

    @classmethod
    def from_yaml(cls, path: str | os.PathLike) -> "PipelineConfig":
        """Read a flat YAML mapping of the field names (dashes or underscores)."""
        import yaml

        path = Path(path)
        try:
            document = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except (OSError, yaml.YAMLError) as error:
            first_line = str(error).strip().splitlines()[0]
            raise InputError(f"cannot read config {str(path)!r}: {first_line}") from None
        if not isinstance(document, dict):
            raise InputError(f"config {str(path)!r} must be a mapping of option names to values")
        known = {f.name for f in fields(cls)}
        values = {}
        for key, value in document.items():
            name = str(key).replace("-", "_")
            if name not in known:
                raise InputError(f"config {str(path)!r}: unknown key {key!r} (known: {', '.join(sorted(known))})")
            if name in cls.PATH_KEYS and value is not None:
                value = str((path.parent / str(value)).resolve())
            values[name] = value
        return cls(**values)


def run_pipeline(config: PipelineConfig, log: Callable[[str], None] = print, progress: bool = False) -> dict:
    """Features → bins → subset (→ export) (→ patch store) in ``config.work_dir``, reusing
    finished stages.

    Each stage's fingerprint covers its upstream stage's fingerprint and its own options; a stage
    whose output records the same fingerprint is reused. Returns the output path of each stage.
    """
    if config.input is None:
        raise InputError("run needs an input (--input or 'input:' in the config)")
    if config.work_dir is None:
        raise InputError("run needs a work directory (--work-dir or 'work_dir:' in the config)")
    if config.drop is not None:  # checked before any stage runs
        if isinstance(config.drop, bool) or not isinstance(config.drop, (int, float)) or not 0 <= config.drop < 1:
            raise InputError(f"drop must be a ratio in [0, 1), got {config.drop!r}")
        if input_kind(config.input) == "text":
            raise InputError("drop: pixel quantization needs images, the input is text")
    work_dir = Path(config.work_dir)
    options = asdict(config)
    input_path = Path(config.input).resolve()

    features_dir = work_dir / "features"
    features_fp = fingerprint_document(
        {
            "input": _input_fingerprint(input_path),
            "checkpoint": fingerprint_file(config.checkpoint) if config.checkpoint else None,
            **{key: options[key] for key in (
                "model", "mode", "grad_delta", "text_model", "num_classes", "img_size", "device", "strict",
                "feature_seed",
            )},
        }
    )
    if _recorded_fingerprint(features_dir / SIDECAR_NAME, "features") == features_fp:
        log(f"features: reused {features_dir}")
    else:
        started = time.perf_counter()
        sidecar = extract_features(
            input_path,
            features_dir,
            model=config.model,
            checkpoint=config.checkpoint,
            mode=config.mode,
            grad_delta=config.grad_delta,
            text_model=config.text_model,
            num_classes=config.num_classes,
            img_size=config.img_size,
            batch_size=config.batch_size,
            device=config.device,
            workers=config.workers,
            strict=config.strict,
            seed=config.feature_seed,
            progress=progress,
            stage_fingerprint=features_fp,
        )
        log(f"features: wrote {features_dir} ({sidecar['count']} samples, "
            f"{time.perf_counter() - started:.1f} s)")

    bins_path = work_dir / "bins.npz"
    bins_fp = fingerprint_document(
        {
            "features": features_fp,
            **{key: options[key] for key in ("bins", "per_class", "metric", "lam", "bin_device", "backend", "sizes")},
        }
    )
    if _recorded_fingerprint(bins_path, "bins") == bins_fp:
        log(f"bins: reused {bins_path}")
    else:
        outcome = make_bins(
            features_dir,
            config.bins,
            out=bins_path,
            use_labels=config.per_class,
            metric=config.metric,
            lam=config.lam,
            device=config.bin_device,
            backend=config.backend,
            sizes=config.sizes,
            stage_fingerprint=bins_fp,
        )
        log(f"bins: wrote {bins_path} (backend {outcome.result.backend}, {outcome.seconds:.2f} s, "
            f"sizes {bin_sizes_summary(outcome.result.bin_sizes)})")

    subset_path = work_dir / "subset.npy"
    subset_fp = fingerprint_document(
        {"bins": bins_fp, **{key: options[key] for key in ("ratio", "seed", "allocation")}}
    )
    if _recorded_fingerprint(subset_path, "subset") == subset_fp:
        log(f"sample: reused {subset_path}")
    else:
        subset = draw_subset(
            bins_path, config.ratio, seed=config.seed, allocation=config.allocation, stage_fingerprint=subset_fp
        )
        save_subset(subset, bins_path, subset_path)
        log(f"sample: wrote {subset_path} ({len(subset.indices)} samples)")

    outputs = {"features": features_dir, "bins": bins_path, "subset": subset_path}
    if config.export is not None:
        export_dir = Path(config.export).resolve()
        export_record = work_dir / "export.json"
        export_fp = fingerprint_document({"subset": subset_fp, "dir": str(export_dir), "link": config.link})
        recorded_fp = _recorded_fingerprint(export_record, "export")
        if recorded_fp == export_fp and export_dir.is_dir():
            log(f"export: reused {export_dir}")
        else:
            # The directory of this run's previous export is replaced; any other is left alone.
            previous_dir = json.loads(export_record.read_text(encoding="utf-8"))["dir"] if recorded_fp else None
            export_subset(
                load_subset_indices(subset_path),
                export_dir,
                features_sidecar=read_manifest(subset_path).get("features_sidecar"),
                link=config.link,
                replace=previous_dir == str(export_dir),
            )
            write_json(export_record, {"dir": str(export_dir), "stage_fingerprint": export_fp})
            log(f"export: wrote {export_dir}")
        outputs["export"] = export_dir
    if config.drop is not None:
        outputs["patches"] = _quantize_stage(config, work_dir, subset_path, subset_fp, log, progress)
    return outputs


def _quantize_stage(config: PipelineConfig, work_dir: Path, subset_path: Path, subset_fp: str,
                    log: Callable[[str], None], progress: bool) -> Path:
    """The pixel-quantization stage of ``run_pipeline``: GradCAM++ patch store of the subset in
    work_dir/patches, reused while the subset and the quantization options are unchanged."""
    from dqkernels.pixel.gradcam import quantize_images

    store_dir = work_dir / "patches"
    record = work_dir / "patches.json"
    options = {key: getattr(config, key) for key in (
        "drop", "quantize_img_size", "quantize_grid", "cam_model", "cam_checkpoint", "feature_seed")}
    quantize_fp = fingerprint_document({"subset": subset_fp, **options})
    recorded_fp = _recorded_fingerprint(record, "patches")
    if recorded_fp == quantize_fp and store_dir.is_dir():
        log(f"quantize: reused {store_dir}")
        return store_dir
    if recorded_fp is not None and store_dir.is_dir():
        shutil.rmtree(store_dir)  # this run's own previous store, made with other options
    started = time.perf_counter()
    outcome = quantize_images(
        config.input, store_dir, subset=subset_path, drop=config.drop,
        img_size=config.quantize_img_size, grid=config.quantize_grid, cam_model=config.cam_model,
        cam_checkpoint=config.cam_checkpoint, batch_size=config.batch_size, device=config.device,
        workers=config.workers, seed=config.feature_seed, progress=progress,
    )
    write_json(record, {"dir": str(store_dir), "stage_fingerprint": quantize_fp})
    log(f"quantize: wrote {store_dir} ({outcome.count} images, {outcome.kept} of "
        f"{outcome.num_patches} patches kept, {outcome.image_bytes} -> {outcome.store_bytes} bytes, "
        f"{time.perf_counter() - started:.1f} s)")
    return store_dir


def _input_fingerprint(input_path: Path) -> str:
    """Fingerprint of the pipeline input, as recorded in the feature sidecar."""
    kind = input_kind(input_path)
    if kind == "image-folder":
        from dqkernels.features.image import list_image_folder

        return fingerprint_file_listing(input_path, list_image_folder(input_path).relative_paths)
    if kind == "text":
        return fingerprint_file(input_path)
    from dqkernels.features.image import load_image_array

    return fingerprint_arrays(*load_image_array(input_path))


def _recorded_fingerprint(path: Path, stage: str) -> Optional[str]:
    """The stage fingerprint stored in an existing output, or None when there is none."""
    try:
        if stage == "bins":
            return load_bins_file(path).meta.get("stage_fingerprint") if path.is_file() else None
        if stage == "subset":
            return read_manifest(path).get("stage_fingerprint") if path.is_file() else None
        document = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    except ValueError:
        return None
    if stage == "features" and not all(
        (path.parent / name).is_file() for name in document.get("files", {}).values()
    ):
        return None
    return document.get("stage_fingerprint")
