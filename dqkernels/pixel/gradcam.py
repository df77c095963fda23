"""Pixel quantization (docs/method.md §4): score patches with GradCAM++, keep the informative ones, store them.

    scores = gradcampp_patch_scores(images, cam_model)          # (N, L), batched, fp32
    keep_mask = keep_mask_from_scores(scores, drop=0.25)        # (N, L) bool, L_keep per row
    quantize_images("data/train", "patches/", subset="subset.npy")  # all of it, into a patch store

GradCAM++ here is one forward and one ``torch.autograd.grad`` per batch: the target layer's output
A is captured by a forward hook as a fresh leaf, so the graph (and the backward) covers only the
layers after it, and the gradients of the summed target logits give every image's own g = ∂y^c/∂A
(images do not interact in eval mode).
"""

from __future__ import annotations

import difflib
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from dqkernels.core.errors import InputError, InputTypeError
from dqkernels.pixel.patch_store import (
    PatchGeometry,
    PatchStore,
    PatchStoreWriter,
    check_empty_destination,
)

CAM_MODES = ("paper", "compat")
CAM_TARGETS = ("pred", "label")
CAM_IMAGE_SIZE = 224  # the CAM network sees every image at 224×224 (a 7×7 map for resnet18)
DEFAULT_DROP = 0.25
GRADCAMPP_EPS = 1e-6


def keep_count(num_patches: int, drop: float) -> int:
    """L_keep = floor(L · (1 − drop)), the patches kept per image; drop must be in [0, 1).

    The product is rounded to 9 decimals before the floor, so that e.g. 10 · (1 − 0.9) keeps 1
    patch, not 0 (float error). Raises ValueError when nothing would be kept.
    """
    if isinstance(drop, bool) or not isinstance(drop, (int, float, np.floating)) or not 0 <= drop < 1:
        raise InputError(f"drop must be a ratio in [0, 1), got {drop!r}")
    kept = math.floor(round(num_patches * (1.0 - float(drop)), 9))
    if kept < 1:
        raise InputError(f"drop={drop} keeps no patch of {num_patches}; use a smaller drop ratio")
    return kept


def resolve_target_layer(model, target_layer: Optional[str] = None):
    """(name, module) of the layer whose output GradCAM++ explains.

    Default: the module of the model's last feature stage in timm's ``feature_info`` (``layer4``
    for a ResNet). Raises ValueError for a name that is not a submodule of ``model``.
    """
    modules = dict(model.named_modules())
    if target_layer is None:
        feature_info = getattr(model, "feature_info", None)
        if not feature_info:
            raise InputError("the model has no timm feature_info; name its last convolutional stage with target_layer")
        target_layer = feature_info[-1]["module"]
    if target_layer not in modules or target_layer == "":
        close = difflib.get_close_matches(str(target_layer), [name for name in modules if name], n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise InputError(f"target_layer {target_layer!r} is not a module of the model{hint}")
    return target_layer, modules[target_layer]


def gradcampp_map(activations, gradients):
    """GradCAM++ map (B, h, w) float32 from activations and gradients (B, K, h, w) float32.

    α = g² / (2g² + (Σ_ab A_ab)·g³ + 1e-6) (0 where g = 0), w_k = Σ_ij α·relu(g),
    cam = relu(Σ_k w_k A_k).
    """
    import torch

    squared = gradients * gradients
    cubed = squared * gradients
    activation_sums = activations.sum(dim=(2, 3), keepdim=True)
    alpha = squared / (2 * squared + activation_sums * cubed + GRADCAMPP_EPS)
    alpha = torch.where(gradients != 0, alpha, torch.zeros_like(alpha))
    channel_weights = (alpha * torch.relu(gradients)).sum(dim=(2, 3), keepdim=True)
    return torch.relu((channel_weights * activations).sum(dim=1))


def cam_patch_scores(cam, image_size: tuple[int, int], patch: int, mode: str = "paper"):
    """Patch scores (B, L) float32 of maps (B, h, w), row-major over the (H/patch, W/patch) grid.

    paper: the map upsampled bilinearly to the image (H, W), then averaged over each patch.
    compat: the map resized straight to the patch grid (bilinear, as the official code).
    """
    import torch.nn.functional as F

    height, width = image_size
    grid = (height // patch, width // patch)
    maps = cam[:, None]
    if mode == "paper":
        upsampled = F.interpolate(maps, size=(height, width), mode="bilinear", align_corners=False)
        pooled = F.avg_pool2d(upsampled, kernel_size=patch)
    else:
        pooled = F.interpolate(maps, size=grid, mode="bilinear", align_corners=False, antialias=True)
    return pooled.flatten(1)


def gradcampp_patch_scores(images, model, target="pred", patch: int = 16, mode: str = "paper", *,
                           target_layer: Optional[str] = None, batch_size: int = 64):
    """GradCAM++ importance of every patch of every image: (N, L) float32 on the CPU.

    images: (N, 3, H, W) float tensor, already normalised as ``model`` expects; H and W must be
        multiples of ``patch``. Batches are moved to the model's device.
    model: a float32 CNN (any timm CNN); run in eval mode (its mode and its parameters'
        ``requires_grad`` are restored afterwards). It must return (B, classes) logits.
    target: "pred" — each image's own argmax class (the official behaviour) — or the class
        labels, (N,) integers.
    patch: patch size in pixels of ``images``; L = (H/patch)·(W/patch), row-major.
    mode: "paper" or "compat" (see :func:`cam_patch_scores`).
    target_layer: name of the explained module; default the last timm feature stage.
    batch_size: images per forward pass; each batch is one forward and one ``autograd.grad``.
    """
    import torch

    if not isinstance(images, torch.Tensor):
        raise InputTypeError(f"images must be a torch.Tensor (N, 3, H, W), got {type(images).__name__}")
    if images.ndim != 4 or not images.is_floating_point():
        raise InputError(f"images must be a floating (N, 3, H, W) tensor, got {images.dtype} {tuple(images.shape)}")
    count, height, width = images.shape[0], images.shape[2], images.shape[3]
    if isinstance(patch, bool) or not isinstance(patch, int) or patch < 1 or height % patch or width % patch:
        raise InputError(f"patch must be a positive integer dividing the image size {height}x{width}, got {patch!r}")
    if mode not in CAM_MODES:
        raise InputError(f"mode must be one of {CAM_MODES}, got {mode!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise InputError(f"batch_size must be a positive integer, got {batch_size!r}")
    labels = None
    if isinstance(target, str):
        if target != "pred":
            raise InputError(f"target must be 'pred' or an array of {count} class labels, got {target!r}")
    else:
        labels = torch.as_tensor(np.asarray(target))
        if labels.shape != (count,) or labels.dtype.is_floating_point or labels.dtype == torch.bool:
            raise InputError(f"target labels must be {count} integers, got {labels.dtype} {tuple(labels.shape)}")
        if count and int(labels.min()) < 0:
            raise InputError("target labels must be non-negative")
    layer_name, layer = resolve_target_layer(model, target_layer)
    parameters = list(model.parameters())
    if not parameters or any(parameter.dtype != torch.float32 for parameter in parameters):
        raise InputTypeError("model must be a float32 network (GradCAM++ runs in fp32)")
    device = parameters[0].device

    captured = []

    def capture_activations(module, inputs, output):
        leaf = output.detach().requires_grad_(True)
        captured.append(leaf)
        return leaf.clone()  # in-place ops after the layer must not modify the captured leaf

    scores = torch.empty(count, (height // patch) * (width // patch), dtype=torch.float32)
    was_training = model.training
    requires_grad = [parameter.requires_grad for parameter in parameters]
    model.eval()
    model.requires_grad_(False)  # the graph starts at the captured activations
    handle = layer.register_forward_hook(capture_activations)
    try:
        with torch.enable_grad():
            for start in range(0, count, batch_size):
                batch = images[start : start + batch_size].to(device=device, dtype=torch.float32)
                captured.clear()
                logits = model(batch)
                if len(captured) != 1:
                    raise InputError(f"target_layer {layer_name!r} ran {len(captured)} times in one forward pass")
                activations = captured[0]
                if activations.ndim != 4 or logits.ndim != 2:
                    raise InputError(
                        f"target_layer {layer_name!r} must output (B, C, h, w) maps and the model (B, classes) "
                        f"logits; got {tuple(activations.shape)} and {tuple(logits.shape)}"
                    )
                if labels is None:
                    classes = logits.argmax(dim=1)
                else:
                    classes = labels[start : start + batch.shape[0]].to(device=device, dtype=torch.int64)
                    if int(classes.max()) >= logits.shape[1]:
                        raise InputError(f"target label {int(classes.max())} does not fit {logits.shape[1]} classes")
                target_sum = logits.gather(1, classes[:, None]).sum()
                (gradients,) = torch.autograd.grad(target_sum, activations)
                cam = gradcampp_map(activations.detach(), gradients)
                scores[start : start + batch.shape[0]] = cam_patch_scores(cam, (height, width), patch, mode).cpu()
    finally:
        handle.remove()
        for parameter, flag in zip(parameters, requires_grad):
            parameter.requires_grad_(flag)
        model.train(was_training)
    return scores


def keep_mask_from_scores(scores, drop: float = DEFAULT_DROP):
    """(N, L) bool tensor: True for the L_keep = floor(L·(1 − drop)) highest scores of each row.

    scores: (N, L) float tensor. Equal scores are ranked by patch index (a stable sort), so an
    all-zero row keeps its first L_keep patches.
    """
    import torch

    kept = keep_count(scores.shape[1], drop)
    ranking = torch.sort(scores, dim=1, descending=True, stable=True).indices
    keep_mask = torch.zeros(scores.shape, dtype=torch.bool, device=scores.device)
    return keep_mask.scatter_(1, ranking[:, :kept], True)


# --------------------------------------------------------------------------- images → patch store


@dataclass
class SourceSamples:
    """The images chosen for quantization and their place in the data set.

    kind: "image-folder" or "image-array". path: the folder or the array file.
    sample_ids: (N,) int64 dataset ids (rows of the features the subset was drawn from).
    labels: (N,) int64 class indices, or None. items: N paths relative to the folder, or None.
    class_names: names of the class indices (image folders), or None.
    features_sidecar: the feature set whose rows the ids are, or None when it is not known.
    """

    kind: str
    path: Path
    sample_ids: np.ndarray
    labels: Optional[np.ndarray]
    items: Optional[list]
    class_names: Optional[list]
    features_sidecar: Optional[Path] = None


def select_samples(
    images_path: str | os.PathLike,
    subset: Optional[str | os.PathLike] = None,
    features: Optional[str | os.PathLike] = None,
) -> SourceSamples:
    """Map the ids of ``subset`` (a ``dqk sample`` .npy; default: every image) to the images.

    Ids are rows of the feature set the subset was drawn from (docs/method.md §3.5): ``features``
    (a feature-set directory or its ``features.json``), else the one the subset's manifest names
    (or the ``features.json`` beside the subset, when the feature folder was moved with it).

    Image folder: every id is resolved through the feature set's recorded items — by relative
    path, with the recorded size, inside ``images_path`` — and never through a fresh listing when
    the feature set records items. Without recorded items, the folder's listing (torchvision
    ``ImageFolder`` order) is used only when no subset is given or the subset's row count equals
    the number of images. Image array: the ids are its rows; a feature set's row count must match.
    Raises InputError naming the first id that cannot be resolved.
    """
    from dqkernels.features.image import load_image_array
    from dqkernels.formats.feature_set import id_origin
    from dqkernels.formats.inputs import input_kind
    from dqkernels.formats.items import list_image_folder, resolve_items
    from dqkernels.formats.subset import load_subset_indices

    path = Path(images_path)
    kind = input_kind(path)
    if kind == "text":
        raise InputError(f"images {str(path)!r} must be an image folder or a .npy/.npz image array")
    sample_ids = load_subset_indices(subset) if subset is not None else None
    origin = id_origin(subset, features)
    if origin.source_kind is not None and origin.source_kind != kind:
        raise InputError(
            f"the subset's feature set {str(origin.sidecar_path)!r} was extracted from {origin.source_kind} "
            f"data but {str(path)!r} is {kind} data"
        )
    labels = items = class_names = None
    if kind == "image-folder":
        all_items = origin.items()
        if all_items is not None:
            class_names = origin.sidecar["source"].get("classes")
            if class_names is None:
                class_names = sorted({item.path.split("/")[0] for item in all_items})
        else:
            listing = list_image_folder(path)
            all_items, class_names = listing.items, listing.class_names
            if sample_ids is not None and origin.count != len(all_items):
                known = "an unknown number of" if origin.count is None else str(origin.count)
                raise InputError(
                    f"subset {str(subset)!r} ids are rows of {known} features that record no items, so they "
                    f"cannot be tied to the {len(all_items)} images of {str(path)!r} by path; give the feature "
                    "set from `dqk features` (--features)"
                )
        total = len(all_items)
    else:
        images, all_labels = load_image_array(path)
        total = images.shape[0]
        if origin.count is not None and origin.count != total:
            raise InputError(
                f"{str(path)!r} holds {total} images but the subset's ids are rows of {origin.count} samples; "
                "an image array's rows are the ids, so it must be the array the features were extracted from"
            )
    if sample_ids is None:
        sample_ids = np.arange(total, dtype=np.int64)
    if sample_ids.size and sample_ids[-1] >= total:
        raise InputError(f"subset id {int(sample_ids[-1])} is out of range for {str(path)!r} ({total} images)")
    if kind == "image-folder":
        resolve_items(path, all_items, sample_ids.tolist())
        items = [all_items[row].path for row in sample_ids.tolist()]
        class_index = {name: index for index, name in enumerate(class_names)}
        try:
            labels = np.array([class_index[item.split("/")[0]] for item in items], dtype=np.int64)
        except KeyError as error:
            raise InputError(f"image {error.args[0]!r} is in no class folder of {str(path)!r}") from None
    elif all_labels is not None:
        labels = all_labels[sample_ids]
    return SourceSamples(kind, path, sample_ids, labels, items, class_names, origin.sidecar_path)


def _uint8_batches(samples: SourceSamples, img_size: int, batch_size: int, workers: int):
    """Yield (positions (B,) int64 into ``samples``, uint8 pixels (B, 3, S, S) tensor), S = img_size."""
    import torch

    if samples.kind == "image-folder":
        from dqkernels.features.image import _file_batches

        paths = [str(samples.path / item) for item in samples.items]
        for rows, pixels, failures in _file_batches(paths, img_size, batch_size, workers, pin_memory=False):
            if failures:
                row, reason = failures[0]
                raise InputError(f"cannot read image {paths[row]!r}: {reason}")
            yield rows.numpy(), pixels
        return

    from dqkernels.features.image import load_image_array

    images, _ = load_image_array(samples.path)
    for start in range(0, samples.sample_ids.shape[0], batch_size):
        positions = np.arange(start, min(start + batch_size, samples.sample_ids.shape[0]))
        chunk = np.asarray(images[samples.sample_ids[positions]])
        if chunk.ndim == 3:
            chunk = chunk[..., None]
        pixels = torch.from_numpy(np.ascontiguousarray(chunk)).permute(0, 3, 1, 2)
        if pixels.shape[1] == 1:
            pixels = pixels.expand(-1, 3, -1, -1)
        if pixels.dtype != torch.uint8 or tuple(pixels.shape[2:]) != (img_size, img_size):
            values = pixels.float() / 255.0 if pixels.dtype == torch.uint8 else pixels.float()
            if tuple(values.shape[2:]) != (img_size, img_size):
                values = torch.nn.functional.interpolate(
                    values, size=(img_size, img_size), mode="bilinear", align_corners=False, antialias=True
                )
            pixels = (values.clamp(0, 1) * 255).round().to(torch.uint8)
        yield positions, pixels.contiguous()


@dataclass
class QuantizeOutcome:
    """A written patch store: where, how many images, patches kept of L, bytes before and after."""

    path: Path
    count: int
    kept: int
    num_patches: int
    image_bytes: int
    store_bytes: int


def quantize_images(
    images: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    subset: Optional[str | os.PathLike] = None,
    features: Optional[str | os.PathLike] = None,
    drop: float = DEFAULT_DROP,
    img_size: int = 224,
    grid: int = 14,
    cam_model: str = "resnet18",
    cam_checkpoint: Optional[str | os.PathLike] = None,
    cam_layer: Optional[str] = None,
    target: str = "pred",
    mode: str = "paper",
    batch_size: int = 64,
    device=None,
    workers: int = 0,
    seed: int = 0,
    progress: Optional[Callable[[int, int], None]] = None,
) -> QuantizeOutcome:
    """Score, drop and store the patches of the images of ``subset`` into the new store ``out_dir``.

    images: an image folder or a .npy/.npz image array (see :func:`select_samples` for how the
        subset's ids map to images). Every image is resized to ``img_size`` × ``img_size`` and cut
        into ``grid`` × ``grid`` patches of img_size / grid pixels; the grid must match the MAE
        that will reconstruct them (14 for base and large, 16 for huge).
    features: the feature set whose rows the subset's ids are; default: the one the subset's
        manifest names (see :func:`select_samples`).
    drop: fraction θ of the patches dropped, in [0, 1); each image keeps floor(L·(1 − θ)).
    cam_model / cam_checkpoint / seed: the timm CAM network and its local weights (strictly
        loaded; without them it is randomly initialised from ``seed``). It sees the images at
        224 × 224 with its own mean/std; ``cam_layer`` names its explained layer.
    target: "pred" (its own prediction) or "label" (the data set's class). mode: "paper" | "compat".
    progress: None, or a callable(done, total) told the images stored after every batch.
    Nothing is left at ``out_dir`` unless the whole store was written.
    """
    from dqkernels.core.fingerprint import fingerprint_file
    from dqkernels.features.image import _resize_normalize, build_model, resolve_device

    if isinstance(grid, bool) or not isinstance(grid, int) or grid < 1 or CAM_IMAGE_SIZE % grid:
        raise InputError(f"grid must be a positive integer dividing {CAM_IMAGE_SIZE}, got {grid!r}")
    if isinstance(img_size, bool) or not isinstance(img_size, int) or img_size < grid or img_size % grid:
        raise InputError(f"img_size must be a positive multiple of the grid ({grid}), got {img_size!r}")
    kept = keep_count(grid * grid, drop)
    if target not in CAM_TARGETS:
        raise InputError(f"target must be one of {CAM_TARGETS}, got {target!r}")
    if mode not in CAM_MODES:
        raise InputError(f"mode must be one of {CAM_MODES}, got {mode!r}")
    samples = select_samples(images, subset, features)
    if target == "label" and samples.labels is None:
        raise InputError(f"target 'label' needs labels; {str(samples.path)!r} has none")
    check_empty_destination(out_dir, "patch store")
    device = resolve_device(device)
    network = build_model(cam_model, checkpoint=cam_checkpoint, seed=seed).to(device)
    layer_name, _ = resolve_target_layer(network, cam_layer)
    if target == "label" and samples.labels.size and int(samples.labels.max()) >= network.num_classes:
        raise InputError(
            f"label {int(samples.labels.max())} does not fit the CAM model's {network.num_classes} classes"
        )
    mean, std = network.pretrained_cfg["mean"], network.pretrained_cfg["std"]

    count = int(samples.sample_ids.shape[0])
    geometry = PatchGeometry(img_size, img_size, img_size // grid)
    meta = {
        "source": {
            "path": str(samples.path.resolve()),
            "kind": samples.kind,
            "subset": str(Path(subset).resolve()) if subset is not None else None,
            "features_sidecar": str(samples.features_sidecar.resolve()) if samples.features_sidecar else None,
        },
        "scoring": {
            "method": "gradcam++",
            "cam_model": cam_model,
            "cam_checkpoint": str(Path(cam_checkpoint).resolve()) if cam_checkpoint is not None else "random-init",
            "cam_checkpoint_sha256": fingerprint_file(cam_checkpoint) if cam_checkpoint is not None else None,
            "seed": None if cam_checkpoint is not None else seed,
            "target_layer": layer_name,
            "target": target,
            "mode": mode,
            "cam_image_size": CAM_IMAGE_SIZE,
            "drop": float(drop),
            "kept_per_image": kept,
        },
    }
    with PatchStoreWriter(out_dir, geometry, count, count * kept, class_names=samples.class_names,
                          meta=meta) as writer:
        done = 0
        for positions, pixels in _uint8_batches(samples, img_size, batch_size, workers):
            cam_input = _resize_normalize(pixels.to(device).float() / 255.0, CAM_IMAGE_SIZE, mean, std)
            labels = samples.labels[positions] if samples.labels is not None else None
            scores = gradcampp_patch_scores(
                cam_input, network, target="pred" if target == "pred" else labels,
                patch=CAM_IMAGE_SIZE // grid, mode=mode, target_layer=layer_name, batch_size=len(positions),
            )
            writer.append(
                pixels.permute(0, 2, 3, 1).numpy(),
                keep_mask_from_scores(scores, drop).numpy(),
                samples.sample_ids[positions],
                labels,
                [samples.items[position] for position in positions] if samples.items is not None else None,
            )
            done += len(positions)
            if progress is not None:
                progress(done, count)
    store = PatchStore(out_dir)
    return QuantizeOutcome(Path(out_dir), count, kept, geometry.num_patches,
                           store.header["bytes"]["images"], store.stored_bytes())
