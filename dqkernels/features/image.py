"""Image features from timm models: pooled penultimate features or docs/method.md §1 gradient embeddings.

Two kinds of image input are read here:

* an ImageFolder tree (``root/<class>/.../<image>``), listed in torchvision ``ImageFolder``
  order with each file's size (:func:`dqkernels.formats.items.list_image_folder`, re-exported
  here), labels = index of the class folder in sorted order;
* an array of images ``(N, H, W)`` or ``(N, H, W, C)`` (C = 1 or 3), uint8 in [0, 255] or float
  in [0, 1], from a ``.npy`` file or from the ``images`` array of a ``.npz`` file (with an
  optional ``labels`` array).

Weights (:func:`build_model`) come from one of three places: timm's own pretrained machinery
(``timm.create_model(name, pretrained=True)``: its Hugging Face hub cache, downloaded on first
use; pretrained tags such as ``resnet18.a1_in1k`` and ``hf-hub:`` names; or a local weights file
through ``pretrained_cfg_overlay=dict(file=...)``), a local checkpoint loaded strictly, or a
seeded random initialisation, which callers must ask for explicitly (:data:`RANDOM_INIT_WARNING`).

Images are resized straight to ``img_size × img_size`` (bilinear) and normalised with the
model's mean/std. Gradient mode (docs/method.md §1) stores, per sample, δ = ∂CE/∂z for the logits
z = W·e + b of the model's final linear layer (C values) and the embedding e that layer reads
(D values) — never the C·D-dimensional gradient itself.
"""

from __future__ import annotations

import contextlib
import difflib
import os
import re
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional, Sequence

import numpy as np

from dqkernels.core.errors import InputError, InputTypeError
from dqkernels.formats.items import (  # noqa: F401 (the image-folder listing, re-exported here)
    IMAGE_EXTENSIONS,
    ImageFolderListing,
    list_image_folder,
)

FEATURE_MODES = ("pooled", "gradient")
GRAD_DELTAS = ("standard", "official")
HF_HUB_PREFIX = "hf-hub:"
RANDOM_INIT_WARNING = (
    "WARNING: features from a random-init network (no weights): bins of these features are of little value"
)
NO_WEIGHTS_HINT = (
    "pass --pretrained (timm's pretrained weights; --weights-file PATH for a local copy), "
    "--checkpoint PATH, or --random-init to really use a random network"
)


@dataclass
class ImageFeatures:
    """What one extraction pass produced; rows follow ``kept_rows``.

    pooled: (N_kept, D) float32 penultimate features (pooled mode), else None.
    delta: (N_kept, C) float32 δ per sample (gradient mode), else None.
    embed: (N_kept, D) float32 embedding e per sample (gradient mode), else None.
    kept_rows: (N_kept,) int64 positions, in the input, of the images that were read.
    skipped: (position, reason) of every image that could not be read.
    """

    pooled: Optional[np.ndarray]
    delta: Optional[np.ndarray]
    embed: Optional[np.ndarray]
    kept_rows: np.ndarray
    skipped: list[tuple[int, str]] = field(default_factory=list)


def load_image_array(path: str | os.PathLike) -> tuple[np.ndarray, Optional[np.ndarray]]:
    """Read images (and labels) from a ``.npy`` or ``.npz`` file.

    Returns ``images`` (N, H, W) or (N, H, W, C) — memory-mapped for ``.npy`` — and ``labels``
    (N,) int64 or None. In a ``.npz`` the images are the ``images`` array (or the only array
    other than ``labels``).
    """
    path = Path(path)
    try:
        if path.suffix == ".npz":
            with np.load(path) as archive:
                names = list(archive.files)
                image_key = "images" if "images" in names else None
                if image_key is None:
                    candidates = [name for name in names if name != "labels"]
                    if len(candidates) != 1:
                        raise InputError(
                            f"{str(path)!r} has arrays {names}; name the images array 'images'"
                        )
                    image_key = candidates[0]
                images = archive[image_key]
                labels = archive["labels"] if "labels" in names else None
        else:
            images = np.load(path, mmap_mode="r")
            labels = None
    except (OSError, EOFError, zipfile.BadZipFile, ValueError) as error:
        # ValueError: numpy refusing pickled or malformed data (our own InputErrors pass through).
        if isinstance(error, InputError):
            raise
        raise InputError(f"cannot read images from {str(path)!r}: {error}") from error
    validate_image_array(images, str(path))
    if labels is not None:
        labels = np.asarray(labels)
        if labels.ndim != 1 or labels.shape[0] != images.shape[0]:
            raise InputError(
                f"labels in {str(path)!r} have shape {labels.shape}, expected ({images.shape[0]},)"
            )
        if not np.issubdtype(labels.dtype, np.integer) or (labels.size and labels.min() < 0):
            raise InputError(f"labels in {str(path)!r} must be non-negative integers")
        labels = labels.astype(np.int64)
    return images, labels


def validate_image_array(images: np.ndarray, name: str) -> None:
    """Raise ValueError unless ``images`` is (N, H, W) or (N, H, W, C∈{1,3}) uint8/float, N ≥ 1."""
    if images.ndim not in (3, 4) or (images.ndim == 4 and images.shape[3] not in (1, 3)):
        raise InputError(
            f"images in {name!r} have shape {images.shape}; expected (N, H, W) or (N, H, W, C) "
            "with C = 1 or 3"
        )
    if images.dtype != np.uint8 and not np.issubdtype(images.dtype, np.floating):
        raise InputError(f"images in {name!r} have dtype {images.dtype}; expected uint8 or float")
    if images.shape[0] == 0:
        raise InputError(f"images in {name!r} are empty (N = 0)")


def check_model_name(model_name: str) -> None:
    """Raise InputError unless timm knows ``model_name``.

    A pretrained tag (``resnet18.a1_in1k``) must be one timm lists for the architecture. An
    ``hf-hub:org/name`` name is checked when the model is built (its config lives on the hub).
    """
    import timm

    if model_name.startswith(HF_HUB_PREFIX):
        if not re.fullmatch(r"[\w.-]+/[\w.-]+(@[\w.-]+)?", model_name[len(HF_HUB_PREFIX):]):
            raise InputError(f"model {model_name!r}: expected hf-hub:ORGANISATION/NAME")
        return
    architecture, _, tag = model_name.partition(".")
    if not timm.is_model(architecture):
        close = difflib.get_close_matches(model_name, timm.list_models(), n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise InputError(f"unknown timm model {model_name!r}{hint}")
    if tag:
        known = [name.partition(".")[2] for name in timm.list_pretrained(f"{architecture}.*")]
        if tag not in known:
            listed = f" (known: {', '.join(known[:8])}{', ...' if len(known) > 8 else ''})" if known else ""
            raise InputError(f"timm has no pretrained tag {tag!r} for {architecture}{listed}")


def weights_source(pretrained: bool = False, weights_file=None, checkpoint=None, random_init: bool = False) -> str:
    """Which weights a model gets: "pretrained", "checkpoint" or "random-init".

    ``weights_file`` implies ``pretrained``. Raises InputError when more than one source is given,
    or none (a random network is only used when ``random_init`` asks for it).
    """
    pretrained = pretrained or weights_file is not None
    given = [name for name, on in (("pretrained", pretrained), ("checkpoint", checkpoint is not None),
                                   ("random_init", random_init)) if on]
    if len(given) > 1:
        raise InputError(f"{' and '.join(given)} exclude each other: give one source of weights")
    if not given:
        raise InputError(f"the image model has no weights: {NO_WEIGHTS_HINT}")
    return {"pretrained": "pretrained", "checkpoint": "checkpoint", "random_init": "random-init"}[given[0]]


def build_model(
    model_name: str,
    checkpoint: Optional[str | os.PathLike] = None,
    num_classes: Optional[int] = None,
    seed: int = 0,
    *,
    pretrained: bool = False,
    weights_file: Optional[str | os.PathLike] = None,
):
    """Create a timm model in eval mode.

    pretrained: load timm's pretrained weights of ``model_name`` through
        ``timm.create_model(pretrained=True)``: from the Hugging Face hub cache, downloaded on
        first use (``hf-hub:org/name`` names and pretrained tags like ``resnet18.a1_in1k`` are
        timm's own). A hub that is needed but cannot be reached raises InputError.
    weights_file: a local weights file given to timm's pretrained machinery
        (``pretrained_cfg_overlay=dict(file=...)``, timm's safe loader); implies ``pretrained``.
        timm adapts it as it adapts downloaded weights (a classifier of another size is dropped).
    checkpoint: local ``.pth``/``.pt``/``.safetensors`` state dict loaded strictly; a checkpoint
        that does not fit the model raises InputError naming the mismatching keys.
    Without any of these the model keeps its random initialisation from
        ``torch.manual_seed(seed)`` (the global RNG state is restored afterwards).
    num_classes: size of the classifier; default: the checkpoint's (or weights file's)
        classifier size, else timm's default for the model.
    """
    import timm
    import torch

    check_model_name(model_name)
    pretrained = pretrained or weights_file is not None
    if pretrained and checkpoint is not None:
        raise InputError("pretrained weights and a checkpoint exclude each other")
    create_kwargs: dict = {}
    if pretrained:
        create_kwargs.update(_pretrained_kwargs(model_name, weights_file, num_classes))
    else:
        state_dict = _read_checkpoint(checkpoint) if checkpoint is not None else None
        if num_classes is None and state_dict is not None:
            num_classes = _checkpoint_num_classes(model_name, state_dict)
        if num_classes is not None:
            create_kwargs["num_classes"] = num_classes
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        try:
            with _timm_load_report() as load_report:
                model = timm.create_model(model_name, pretrained=pretrained, **create_kwargs)
        except OSError as error:  # the hub or a download URL unreachable, or not in the cache
            raise InputError(
                f"cannot get the pretrained weights of {model_name} (hub unreachable and not in the "
                f"cache?): {_first_line(error)}; download them once with network access, or pass "
                "--weights-file PATH (a local weights file) or --checkpoint PATH"
            ) from error
        except RuntimeError as error:
            if not pretrained:
                raise
            source = f"weights file {str(weights_file)!r}" if weights_file is not None else "timm"
            reason = " ".join(str(error).split())
            raise InputError(
                f"cannot load pretrained weights of {model_name} from {source}: "
                f"{reason[:300] + ' ...' if len(reason) > 300 else reason}"
            ) from error
    if pretrained:
        _check_pretrained_load(model, load_report, model_name, weights_file)
    elif checkpoint is not None:
        _load_state_dict_strictly(model, state_dict, model_name, str(checkpoint))
    return model.eval()


@contextlib.contextmanager
def _timm_load_report() -> Iterator[list[str]]:
    """Collect the messages timm logs while it loads pretrained weights (kept from other handlers).

    When it adapts weights (another classifier size), timm loads non-strictly and only logs the
    keys that did not match; these messages are how a weights file of another model is caught.
    """
    import logging

    messages: list[str] = []

    class _Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            messages.append(record.getMessage())

    logger = logging.getLogger("timm.models._builder")
    handler, level, propagate = _Collect(), logger.level, logger.propagate
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    try:
        yield messages
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
        logger.propagate = propagate


def _check_pretrained_load(model, messages: list[str], model_name: str, weights_file) -> None:
    """InputError when timm's non-strict load left parameters other than the classifier unloaded,
    or ignored weights (``messages``: what timm logged while loading)."""
    classifier = model.pretrained_cfg.get("classifier") or ()
    classifier = (classifier,) if isinstance(classifier, str) else tuple(classifier)
    problems = []
    for message in messages:
        match = re.match(r"(Missing|Unexpected) keys \((.*?)\) (discovered|found)", message)
        if match is None:
            continue
        keys = [key for key in match.group(2).split(", ")
                if not any(key.startswith(f"{name}.") for name in classifier)]
        if keys:
            problems.append(f"{len(keys)} {match.group(1).lower()} keys ({_first_few(keys)})")
    if problems:
        source = f"weights file {str(weights_file)!r}" if weights_file is not None else "the pretrained weights"
        raise InputError(f"{source} does not fit {model_name}: {'; '.join(problems)}")


def _pretrained_kwargs(model_name: str, weights_file, num_classes: Optional[int]) -> dict:
    """``timm.create_model`` arguments for pretrained weights (and a local weights file)."""
    from timm.models import get_pretrained_cfg

    kwargs: dict = {}
    if weights_file is not None:
        if model_name.startswith(HF_HUB_PREFIX):
            raise InputError("a weights file goes with a timm model name, not an hf-hub: name")
        # Read once here for a clear error and the classifier size, which timm is told so that it
        # keeps a fine-tuned classifier instead of dropping it.
        file_classes = _checkpoint_num_classes(model_name, _read_checkpoint(weights_file, "weights file"))
        overlay = {"file": str(Path(weights_file).resolve())}
        if file_classes:
            overlay["num_classes"] = file_classes
        if num_classes is None:
            num_classes = file_classes  # 0 (no classifier) for a file without one
        kwargs["pretrained_cfg_overlay"] = overlay
    elif not model_name.startswith(HF_HUB_PREFIX):
        pretrained_cfg = get_pretrained_cfg(model_name)
        if pretrained_cfg is None or not (pretrained_cfg.hf_hub_id or pretrained_cfg.url):
            raise InputError(
                f"timm has no pretrained weights for {model_name}; pass --weights-file PATH or --checkpoint PATH"
            )
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    return kwargs


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _read_checkpoint(checkpoint: str | os.PathLike, what: str = "checkpoint") -> dict:
    """Load a checkpoint's state dict (weights only; 'state_dict'/'model' wrappers unwrapped)."""
    from timm.models import load_state_dict

    path = str(checkpoint)
    if not os.path.isfile(path):
        raise InputError(f"{what} {path!r} does not exist")
    try:
        state_dict = load_state_dict(path, use_ema=False, weights_only=True)
    except Exception as error:  # a corrupt file can fail anywhere inside the unpickler
        raise InputError(f"cannot read {what} {path!r}: {_first_line(error)}") from error
    if not isinstance(state_dict, dict) or not state_dict:
        raise InputError(f"{what} {path!r} holds no state dict")
    return state_dict


def _checkpoint_num_classes(model_name: str, state_dict: dict) -> int:
    """Classifier size stored in a checkpoint (0 when it has no classifier weight)."""
    from timm.models import get_pretrained_cfg

    pretrained_cfg = get_pretrained_cfg(model_name.split(".")[0]) if ":" not in model_name else None
    classifier_names = pretrained_cfg.classifier if pretrained_cfg is not None else None
    if isinstance(classifier_names, (tuple, list)):
        classifier_names = classifier_names[0]
    weight = state_dict.get(f"{classifier_names}.weight") if classifier_names else None
    return int(weight.shape[0]) if weight is not None else 0


def _load_state_dict_strictly(model, state_dict: dict, model_name: str, checkpoint: str) -> None:
    """``model.load_state_dict(strict=True)`` with a one-line ValueError on any mismatch."""
    model_state = model.state_dict()
    missing = [key for key in model_state if key not in state_dict]
    unexpected = [key for key in state_dict if key not in model_state]
    mismatched = [
        f"{key}: checkpoint {tuple(state_dict[key].shape)} vs model {tuple(value.shape)}"
        for key, value in model_state.items()
        if key in state_dict and tuple(state_dict[key].shape) != tuple(value.shape)
    ]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing keys ({_first_few(missing)})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected keys ({_first_few(unexpected)})")
    if mismatched:
        problems.append(f"shape mismatch for {_first_few(mismatched)}")
    if problems:
        raise InputError(f"checkpoint {checkpoint!r} does not fit {model_name}: {'; '.join(problems)}")
    model.load_state_dict(state_dict, strict=True)


def _first_few(items: Sequence[str], shown: int = 3) -> str:
    return ", ".join(items[:shown]) + (", ..." if len(items) > shown else "")


def resolve_device(device=None):
    """``torch.device`` for ``device`` ("cpu", "cuda", "cuda:N"; default: cuda when available).

    Raises ValueError for a CUDA device on a machine without one.
    """
    import torch

    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError as error:
        raise InputError(f"device {device!r} is not a torch device ({error})") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"device {device!r} asked for, but CUDA is not available here; use --device cpu")
    return resolved


def gradient_delta(logits, labels, kind: str = "standard"):
    """δ = ∂CE/∂z per sample: (B, C) float32 from logits (B, C) and int64 labels (B,).

    standard: δ = softmax(z) − onehot(y).
    official: the official code's CE applied to softmax(z) (a double softmax),
        δ = J_softmax(z)ᵀ (softmax(p) − onehot(y)) with p = softmax(z); since
        J_softmax(z) = diag(p) − p pᵀ, δ = p ⊙ u − p (pᵀu) with u = softmax(p) − onehot(y).
    """
    import torch

    logits = logits.float()
    onehot = torch.nn.functional.one_hot(labels, logits.shape[1]).to(logits.dtype)
    probs = torch.softmax(logits, dim=1)
    if kind == "standard":
        return probs - onehot
    if kind == "official":
        upstream = torch.softmax(probs, dim=1) - onehot
        return probs * upstream - probs * (probs * upstream).sum(dim=1, keepdim=True)
    raise InputError(f"grad_delta must be one of {GRAD_DELTAS}, got {kind!r}")


def _resize_normalize(batch, img_size: int, mean, std):
    """(B, C, H, W) float in [0, 1] → (B, 3, img_size, img_size) normalised float32."""
    import torch

    if batch.shape[1] == 1:
        batch = batch.expand(-1, 3, -1, -1)
    if tuple(batch.shape[2:]) != (img_size, img_size):
        batch = torch.nn.functional.interpolate(
            batch, size=(img_size, img_size), mode="bilinear", align_corners=False, antialias=True
        )
    mean_t = torch.as_tensor(mean, dtype=batch.dtype, device=batch.device).view(1, 3, 1, 1)
    std_t = torch.as_tensor(std, dtype=batch.dtype, device=batch.device).view(1, 3, 1, 1)
    return (batch - mean_t) / std_t


class _ImageFileDataset:
    """Item ``row``: (row, uint8 pixels (3, S, S) or None, None or the reason decoding failed).

    The image is converted to RGB and resized to S = img_size; a failure is returned, not raised.
    """

    def __init__(self, paths: Sequence[str], img_size: int):
        self.paths = list(paths)
        self.img_size = img_size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, row: int):
        import torch
        from PIL import Image

        try:
            with Image.open(self.paths[row]) as image:
                image = image.convert("RGB").resize(
                    (self.img_size, self.img_size), Image.Resampling.BILINEAR
                )
                pixels = np.asarray(image, dtype=np.uint8)
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
            return row, None, f"{type(error).__name__}: {error}"
        return row, torch.from_numpy(pixels.copy()).permute(2, 0, 1), None


def _collate_decoded(items):
    """Batch decoded images; items that failed to decode are passed on as (row, reason)."""
    import torch

    decoded = [(row, pixels) for row, pixels, _ in items if pixels is not None]
    failures = [(row, reason) for row, pixels, reason in items if pixels is None]
    rows = torch.tensor([row for row, _ in decoded], dtype=torch.int64)
    pixels = torch.stack([p for _, p in decoded]) if decoded else None
    return rows, pixels, failures


def _file_batches(paths, img_size, batch_size, num_workers, pin_memory) -> Iterator:
    """Yield (rows (B,) int64, uint8 pixels (B, 3, S, S) or None, failures) over image files."""
    from torch.utils.data import DataLoader

    loader = DataLoader(
        _ImageFileDataset(paths, img_size),
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        collate_fn=_collate_decoded,
        pin_memory=pin_memory,
    )
    yield from loader


def _array_batches(images: np.ndarray, batch_size: int) -> Iterator:
    """Yield (rows (B,) int64, pixels (B, C, H, W) tensor, no failures) from an image array."""
    import torch

    for start in range(0, images.shape[0], batch_size):
        chunk = np.array(images[start : start + batch_size])  # a writable copy, also of a memmap
        if chunk.ndim == 3:
            chunk = chunk[..., None]
        rows = torch.arange(start, start + chunk.shape[0], dtype=torch.int64)
        yield rows, torch.from_numpy(chunk).permute(0, 3, 1, 2), []


def extract_image_features(
    model,
    *,
    image_paths: Optional[Sequence[str]] = None,
    images: Optional[np.ndarray] = None,
    labels: Optional[np.ndarray] = None,
    mode: str = "pooled",
    grad_delta: str = "standard",
    img_size: Optional[int] = None,
    batch_size: int = 64,
    device=None,
    num_workers: int = 0,
    strict: bool = False,
    progress: bool = False,
) -> ImageFeatures:
    """Run ``model`` over images in input order and collect features.

    Give either ``image_paths`` (N files, decoded with ``num_workers`` loader processes) or
    ``images`` (N, H, W[, C]) uint8/float array. ``labels`` (N,) int64 are required in gradient
    mode. ``img_size`` defaults to the model's own input size. On CUDA the forward pass runs
    under ``torch.autocast`` (float16); outputs are stored as float32.

    An image that cannot be decoded is skipped and listed in ``skipped``, or raises ValueError
    with ``strict=True`` (also when no image at all could be read).
    """
    import torch
    from tqdm.auto import tqdm

    if mode not in FEATURE_MODES:
        raise InputError(f"mode must be one of {FEATURE_MODES}, got {mode!r}")
    if grad_delta not in GRAD_DELTAS:
        raise InputError(f"grad_delta must be one of {GRAD_DELTAS}, got {grad_delta!r}")
    if (image_paths is None) == (images is None):
        raise InputTypeError("give exactly one of image_paths and images")
    total = len(image_paths) if image_paths is not None else images.shape[0]
    label_tensor = None
    if mode == "gradient":
        classifier = model.get_classifier()
        if not isinstance(classifier, torch.nn.Linear):
            raise InputError(
                "gradient mode needs a model whose classifier is a single Linear layer with "
                f"num_classes > 0; this model's classifier is {type(classifier).__name__}"
            )
        if labels is None:
            raise InputError("gradient mode needs labels (an image folder or a .npz with 'labels')")
        if labels.shape != (total,):
            raise InputError(f"labels have shape {labels.shape}, expected ({total},)")
        if labels.size and int(labels.max()) >= classifier.out_features:
            raise InputError(
                f"label {int(labels.max())} does not fit a classifier with "
                f"{classifier.out_features} classes"
            )
        label_tensor = torch.as_tensor(labels, dtype=torch.int64)

    device = resolve_device(device)
    model = model.to(device).eval()
    img_size = img_size or int(model.pretrained_cfg["input_size"][-1])
    mean, std = model.pretrained_cfg["mean"], model.pretrained_cfg["std"]
    autocast = (
        torch.autocast(device_type="cuda", dtype=torch.float16)
        if device.type == "cuda"
        else contextlib.nullcontext()
    )
    batches = (
        _file_batches(image_paths, img_size, batch_size, num_workers, pin_memory=device.type == "cuda")
        if image_paths is not None
        else _array_batches(images, batch_size)
    )

    outputs: dict[str, np.ndarray] = {}
    kept_rows = np.empty(total, dtype=np.int64)
    kept = 0
    skipped: list[tuple[int, str]] = []
    with torch.inference_mode(), tqdm(
        total=total, unit="img", desc="features", disable=not progress, dynamic_ncols=True
    ) as bar:
        for rows, pixels, failures in batches:
            if failures and strict:
                row, reason = failures[0]
                name = image_paths[row] if image_paths is not None else f"#{row}"
                raise InputError(f"cannot read image {name!r}: {reason}")
            skipped.extend(failures)
            bar.update(len(rows) + len(failures))
            if pixels is None:
                continue
            pixels = pixels.to(device, non_blocking=True)
            pixels = pixels.float() / 255.0 if pixels.dtype == torch.uint8 else pixels.float()
            batch = _resize_normalize(pixels, img_size, mean, std)
            with autocast:
                embedding = model.forward_head(model.forward_features(batch), pre_logits=True)
            embedding = embedding.float()
            if mode == "pooled":
                batch_outputs = {"pooled": embedding}
            else:
                logits = model.get_classifier()(embedding)
                batch_labels = label_tensor[rows].to(device)
                batch_outputs = {
                    "delta": gradient_delta(logits, batch_labels, grad_delta),
                    "embed": embedding,
                }
            for name, values in batch_outputs.items():
                if name not in outputs:
                    outputs[name] = np.empty((total, values.shape[1]), dtype=np.float32)
                outputs[name][kept : kept + len(rows)] = values.cpu().numpy()
            kept_rows[kept : kept + len(rows)] = rows.numpy()
            kept += len(rows)
    if kept == 0:
        raise InputError(f"none of the {total} images could be read (first: {skipped[0][1]})")
    return ImageFeatures(
        pooled=outputs["pooled"][:kept] if "pooled" in outputs else None,
        delta=outputs["delta"][:kept] if "delta" in outputs else None,
        embed=outputs["embed"][:kept] if "embed" in outputs else None,
        kept_rows=kept_rows[:kept],
        skipped=skipped,
    )
