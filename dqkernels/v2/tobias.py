"""Tobias semantic background swap (docs/method.md §5), the augmentation DQ-V2 uses instead of MAE.

An image is cut into a ``grid × grid`` raster of cells. A ResNet-50 — randomly initialised
(seeded), early-trained on the data, or given — scores every cell by the channel sum of its
last-stage feature map pooled onto the grid; the top half of the cells (ceil(grid²/2)) are the
image's **foreground**, the rest its **background**. A Tobias image of a base image A keeps A's
foreground cells and fills A's background cells, in raster order, with the background cells of a
partner B drawn at random from the data set, in a random permutation. Its label is A's.

Everything is batched tensor work: the masks come from one forward pass per batch, and the swap
is one gather and one scatter of grid cells for the whole batch. The randomness of a Tobias image
lives in a small **recipe** — (base id, partner id, permutation key) — so any Tobias image can be
regenerated exactly from its recipe, the stored masks and the original images, alone or in any
batch.

Images are (N, C, H, W) torch tensors, uint8 or float in [0, 1], C = 1 or 3. The swap runs at
``grid · cell_px`` pixels square (default cell_px = round(224 / grid): the 224 px of Tobias);
images of another size are resized to it (bilinear, antialiased) and the results resized back.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import numpy as np

from dqkernels.core.errors import InputError

MASK_MODEL_NAME = "resnet50"
MASK_INPUT_PX = 224
DEFAULT_GRID = 4
SWAP_PX = 224
NO_PARTNER = -1
# The early-trained mask model's optimiser (timm.optim.create_optimizer_v2 arguments).
EARLY_OPTIMIZER = "adamw"
EARLY_LR = 1e-3
EARLY_WEIGHT_DECAY = 0.05

# splitmix64 constants (Steele, Lea & Flood 2014): one 64-bit hash per (recipe key, cell rank).
_GOLDEN_GAMMA = np.uint64(0x9E3779B97F4A7C15)
_MIX_1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX_2 = np.uint64(0x94D049BB133111EB)


def default_cell_px(grid: int) -> int:
    """Side of one swap cell in pixels when none is given: round(224 / grid), at least 1."""
    return max(1, round(SWAP_PX / grid))


def foreground_cell_count(grid: int) -> int:
    """Number of foreground cells of a ``grid × grid`` mask: the top half, ceil(grid² / 2)."""
    return math.ceil(grid * grid / 2)


# --------------------------------------------------------------------------- mask model


def random_mask_model(seed: int = 0, num_classes: int = 1000):
    """The Tobias mask model: a timm ResNet-50 with a seeded random initialisation, eval mode.

    ``zero_init_last=False`` keeps the last BatchNorm of every block at γ = 1, as in the
    torchvision initialisation the official Tobias code uses (timm would zero it). The global
    RNG state is restored afterwards. Nothing is downloaded.
    """
    import timm
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = timm.create_model(
            MASK_MODEL_NAME, pretrained=False, zero_init_last=False, num_classes=num_classes
        )
    return model.eval()


def _float_batch(batch):
    """(B, C, H, W) uint8 or float tensor → float32 in [0, 1]."""
    import torch

    return batch.float() / 255.0 if batch.dtype == torch.uint8 else batch.float()


def _model_inputs(batch, model, input_px: int, device):
    """(B, C, H, W) images → (B, 3, input_px, input_px) float32 normalised with the model's mean/std."""
    from dqkernels.features.image import _resize_normalize

    config = getattr(model, "pretrained_cfg", None) or {}
    mean = config.get("mean", (0.485, 0.456, 0.406))
    std = config.get("std", (0.229, 0.224, 0.225))
    return _resize_normalize(_float_batch(batch.to(device)), input_px, mean, std)


def _image_count(images) -> int:
    return int(images.shape[0]) if hasattr(images, "shape") else len(images)


def train_mask_model(
    images,
    labels,
    *,
    epochs: int = 3,
    batch_size: int = 32,
    lr: float = EARLY_LR,
    weight_decay: float = EARLY_WEIGHT_DECAY,
    optimizer: str = EARLY_OPTIMIZER,
    seed: int = 0,
    input_px: int = MASK_INPUT_PX,
    device=None,
):
    """An "early-trained" mask model: the seeded random ResNet-50 trained ``epochs`` epochs on the data.

    images: (N, C, H, W) uint8/float tensor, or any object with ``len()`` whose ``[rows]``
        (rows: (B,) int64 tensor) gives such a batch. labels: (N,) int64 class ids.
    The images are resized to ``input_px`` and normalised as for the masks; no other
    augmentation. The optimizer comes from ``timm.optim.create_optimizer_v2`` (``optimizer``,
    ``lr``, ``weight_decay``); the batch order is drawn from ``seed``, so training is repeatable
    on one machine. A last batch of a single image is folded into the one before it (BatchNorm
    needs two). Returns the model in eval mode, on ``device``.
    """
    import torch
    from timm.optim import create_optimizer_v2

    from dqkernels.features.image import resolve_device

    labels = torch.as_tensor(np.asarray(labels), dtype=torch.int64)
    count = _image_count(images)
    if labels.shape != (count,):
        raise InputError(f"labels have shape {tuple(labels.shape)}, expected ({count},)")
    if count < 2:
        raise InputError("an early-trained mask model needs at least 2 images")
    if epochs < 1 or batch_size < 1:
        raise InputError(f"epochs and batch_size must be >= 1, got {epochs} and {batch_size}")
    device = resolve_device(device)
    model = random_mask_model(seed, num_classes=int(labels.max()) + 1).to(device)
    torch_optimizer = create_optimizer_v2(model, opt=optimizer, lr=lr, weight_decay=weight_decay)
    loss_fn = torch.nn.CrossEntropyLoss()
    order_generator = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        batches = list(torch.randperm(count, generator=order_generator).split(batch_size))
        if len(batches) > 1 and len(batches[-1]) == 1:
            batches[-2:] = [torch.cat(batches[-2:])]
        for rows in batches:
            inputs = _model_inputs(images[rows], model, input_px, device)
            torch_optimizer.zero_grad(set_to_none=True)
            loss_fn(model(inputs), labels[rows].to(device)).backward()
            torch_optimizer.step()
    return model.eval()


def cell_scores(model, batch, grid: int = DEFAULT_GRID, input_px: int = MASK_INPUT_PX):
    """(B, grid, grid) float32 cell scores of (B, C, H, W) images (moved to the model's device).

    The images are resized to ``input_px`` and normalised; the model's last-stage feature map
    (``forward_features``: timm ResNet children up to ``layer4``, (B, 2048, 7, 7) at 224) is
    pooled onto the grid — for grid 4 on a 7×7 map by Tobias' max-pool (2×2, stride 2,
    padding 1), otherwise by adaptive max pooling — and summed over channels.
    """
    import torch
    import torch.nn.functional as F

    device = next(model.parameters()).device
    with torch.inference_mode():
        feature_map = model.forward_features(_model_inputs(batch, model, input_px, device))
        if feature_map.ndim != 4:
            raise InputError(
                f"the mask model's forward_features gives shape {tuple(feature_map.shape)}; "
                "a (B, C, h, w) feature map is needed (a CNN such as a ResNet)"
            )
        if grid == 4 and tuple(feature_map.shape[-2:]) == (7, 7):
            pooled = F.max_pool2d(feature_map, kernel_size=2, stride=2, padding=1)
        else:
            pooled = F.adaptive_max_pool2d(feature_map, grid)
        return pooled.float().sum(dim=1)


def masks_from_scores(scores):
    """(B, g, g) bool foreground masks: the ceil(g²/2) highest-scoring cells (ties → lower raster index)."""
    import torch

    batch, grid = scores.shape[0], scores.shape[-1]
    flat = scores.reshape(batch, grid * grid)
    ranked = torch.sort(flat, dim=1, descending=True, stable=True).indices
    masks = torch.zeros_like(flat, dtype=torch.bool)
    masks.scatter_(1, ranked[:, : foreground_cell_count(grid)], True)
    return masks.reshape(batch, grid, grid)


def object_masks(
    images,
    model=None,
    grid: int = DEFAULT_GRID,
    seed: int = 0,
    *,
    input_px: int = MASK_INPUT_PX,
    batch_size: int = 32,
    device=None,
):
    """Foreground masks of ``images``: (N, grid, grid) bool numpy, exactly ceil(grid²/2) True each.

    images: (N, C, H, W) uint8/float tensor (or an object with ``len()`` whose ``[rows]``, rows
        a (B,) int64 tensor, gives such a batch).
    model: a CNN whose ``forward_features`` gives a (B, C, h, w) map — e.g. from
        :func:`train_mask_model`, or a timm ResNet-50 loaded from a checkpoint. Default: the
        seeded random ResNet-50 of :func:`random_mask_model` (``seed``).
    The model runs in eval mode, ``batch_size`` images per forward pass, at ``input_px`` pixels
    square (224 in Tobias). Compute the masks once per data set and store them.
    """
    import torch

    from dqkernels.features.image import resolve_device

    if isinstance(grid, bool) or not isinstance(grid, (int, np.integer)) or grid < 1:
        raise InputError(f"grid must be an integer >= 1, got {grid!r}")
    if batch_size < 1:
        raise InputError(f"batch_size must be >= 1, got {batch_size}")
    model = (random_mask_model(seed) if model is None else model).to(resolve_device(device)).eval()
    count = _image_count(images)
    masks = np.empty((count, grid, grid), dtype=bool)
    for start in range(0, count, batch_size):
        rows = torch.arange(start, min(start + batch_size, count))
        scores = cell_scores(model, images[rows], grid, input_px)
        masks[start : start + len(rows)] = masks_from_scores(scores).cpu().numpy()
    return masks


# --------------------------------------------------------------------------- recipes


@dataclass(frozen=True)
class TobiasRecipes:
    """What makes each of T Tobias images, given the originals and their masks.

    base: (T,) int64 id of the image whose foreground (and label) is kept.
    partner: (T,) int64 id of the image whose background is swapped in, or -1 where the
        ``bg_prob`` draw left the base image unchanged.
    key: (T,) int64, non-negative: seeds the permutation of the partner's background cells.
    """

    base: np.ndarray
    partner: np.ndarray
    key: np.ndarray

    def __len__(self) -> int:
        return int(self.base.shape[0])

    @property
    def swapped(self) -> np.ndarray:
        """(T,) bool: whether the Tobias image differs from its base (it has a partner)."""
        return self.partner != NO_PARTNER

    def take(self, rows) -> "TobiasRecipes":
        """The recipes at ``rows`` ((K,) int64 positions), in that order."""
        return TobiasRecipes(self.base[rows], self.partner[rows], self.key[rows])


def choose_bases(n_images: int, mix: float, seed: int = 0) -> np.ndarray:
    """Base ids of round(mix · n_images) Tobias images, sorted: (T,) int64.

    Whole random permutations of range(n_images) are used one after another (seeded), so every
    image is a base ⌊mix⌋ or ⌈mix⌉ times.
    """
    if not (mix >= 0 and math.isfinite(mix)):
        raise InputError(f"mix must be a finite number >= 0, got {mix!r}")
    total = round(mix * n_images)
    rng = np.random.default_rng(seed)
    rounds = -(-total // n_images) if n_images else 0
    permutations = [rng.permutation(n_images) for _ in range(rounds)]
    order = np.concatenate(permutations)[:total] if permutations else np.zeros(0, dtype=np.int64)
    return np.sort(order).astype(np.int64)


def draw_recipes(
    bases, n_images: int, *, bg_prob: float = 1.0, seed: int = 0, partners=None
) -> TobiasRecipes:
    """Recipes for Tobias images of ``bases`` ((T,) int64 ids into a data set of ``n_images``).

    With ``numpy.random.default_rng(seed)``: partners uniform over the data set (skipped when
    ``partners`` (T,) int64 are given), then one uniform draw per recipe — the swap happens when
    it is below ``bg_prob`` — then one 63-bit permutation key per recipe.
    """
    bases = np.asarray(bases, dtype=np.int64)
    if bases.ndim != 1 or (bases.size and (bases.min() < 0 or bases.max() >= n_images)):
        raise InputError(f"bases must be a 1-D array of ids in [0, {n_images})")
    if not 0.0 <= bg_prob <= 1.0:
        raise InputError(f"bg_prob must be in [0, 1], got {bg_prob!r}")
    rng = np.random.default_rng(seed)
    if partners is None:
        partners = rng.integers(0, n_images, size=bases.shape[0], dtype=np.int64)
    partners = np.asarray(partners, dtype=np.int64)
    if partners.shape != bases.shape or (partners.size and (partners.min() < 0 or partners.max() >= n_images)):
        raise InputError(f"partners must be {bases.shape[0]} ids in [0, {n_images})")
    swapped = rng.random(bases.shape[0]) < bg_prob
    keys = rng.integers(0, np.iinfo(np.int64).max, size=bases.shape[0], dtype=np.int64)
    return TobiasRecipes(bases.copy(), np.where(swapped, partners, NO_PARTNER), keys)


def _splitmix64(values: np.ndarray) -> np.ndarray:
    """splitmix64 output for uint64 states ``values`` (any shape; wraps modulo 2⁶⁴)."""
    z = values + _GOLDEN_GAMMA
    z = (z ^ (z >> np.uint64(30))) * _MIX_1
    z = (z ^ (z >> np.uint64(27))) * _MIX_2
    return z ^ (z >> np.uint64(31))


def background_permutations(keys, n_background: int) -> np.ndarray:
    """(T, n_background) int64: for each key a random permutation of range(n_background).

    Row t depends on keys[t] only (a splitmix64 stream seeded by the key, argsorted), so one
    recipe gives the same permutation alone or in any batch.
    """
    keys = np.asarray(keys, dtype=np.int64).astype(np.uint64)
    ranks = np.arange(n_background, dtype=np.uint64) * _GOLDEN_GAMMA
    with np.errstate(over="ignore"):
        stream = _splitmix64(_splitmix64(keys)[:, None] + ranks[None, :])
    return np.argsort(stream, axis=1, kind="stable").astype(np.int64)


# --------------------------------------------------------------------------- the swap


def _as_mask_tensor(masks, device):
    """(B, g, g) numpy or tensor masks → bool tensor on ``device``."""
    import torch

    if not isinstance(masks, torch.Tensor):
        masks = torch.from_numpy(np.asarray(masks))
    if masks.ndim != 3 or masks.shape[1] != masks.shape[2] or masks.dtype != torch.bool:
        raise InputError(f"masks must be (N, grid, grid) bool, got {tuple(masks.shape)} {masks.dtype}")
    return masks.to(device)


def swap_backgrounds(base_images, base_masks, partner_images, partner_masks, keys, swapped):
    """The Tobias swap at working resolution, batched: (B, C, S, S) in, (B, C, S, S) out, same dtype.

    base_images, partner_images: (B, C, S, S) tensors, S a multiple of the grid g.
    base_masks, partner_masks: (B, g, g) bool, True = foreground; every mask has the same number
        of foreground cells. keys: (B,) int64 permutation keys. swapped: (B,) bool; rows where it
        is False come back unchanged.
    Row b: base background cell j (raster order) ← partner background cell perm_b[j] (raster
    order), perm_b = ``background_permutations(keys)[b]``; foreground cells keep the base pixels.
    """
    import torch

    batch, channels, side = base_images.shape[0], base_images.shape[1], base_images.shape[-1]
    device = base_images.device
    base_masks = _as_mask_tensor(base_masks, device)
    partner_masks = _as_mask_tensor(partner_masks, device)
    grid = base_masks.shape[-1]
    if partner_images.shape != base_images.shape or base_images.shape[-2] != side or side % grid:
        raise InputError(
            f"base and partner images must both be (B, C, S, S) with S a multiple of the grid {grid}; "
            f"got {tuple(base_images.shape)} and {tuple(partner_images.shape)}"
        )
    if base_masks.shape != (batch, grid, grid) or partner_masks.shape != (batch, grid, grid):
        raise InputError(f"masks must be ({batch}, {grid}, {grid}) for {batch} images")
    foreground = torch.cat([base_masks, partner_masks]).reshape(2 * batch, -1).sum(dim=1)
    if batch and not bool((foreground == foreground[0]).all()):
        raise InputError("every mask must have the same number of foreground cells")
    n_background = grid * grid - (int(foreground[0]) if batch else 0)
    cell = side // grid

    def as_cells(images):  # (B, C, S, S) → (B, g·g, C, cell, cell), cells in raster order
        cells = images.reshape(batch, channels, grid, cell, grid, cell).permute(0, 2, 4, 1, 3, 5)
        return cells.reshape(batch, grid * grid, channels, cell, cell)

    def background_cells(masks):  # (B, n_background) cell ids of the background, raster order
        return torch.argsort(masks.reshape(batch, -1).to(torch.uint8), dim=1, stable=True)[:, :n_background]

    def expand(cell_ids):
        return cell_ids[:, :, None, None, None].expand(-1, -1, channels, cell, cell)

    base_cells = as_cells(base_images)
    permutation = torch.as_tensor(background_permutations(np.asarray(keys), n_background), device=device)
    source_cells = background_cells(partner_masks).gather(1, permutation)
    swapped_cells = base_cells.clone()
    swapped_cells.scatter_(
        1, expand(background_cells(base_masks)), as_cells(partner_images).gather(1, expand(source_cells))
    )
    keep = torch.as_tensor(np.asarray(swapped), device=device).reshape(batch, 1, 1, 1, 1)
    cells = torch.where(keep, swapped_cells, base_cells)
    cells = cells.reshape(batch, grid, grid, channels, cell, cell).permute(0, 3, 1, 4, 2, 5)
    return cells.reshape(batch, channels, side, side)


def resize_images(images, height: int, width: int):
    """(B, C, H, W) → (B, C, height, width), same dtype: bilinear, antialiased; uint8 rounded.

    Returned unchanged when the size already matches.
    """
    import torch

    if tuple(images.shape[-2:]) == (height, width):
        return images
    resized = torch.nn.functional.interpolate(
        images.float(), size=(height, width), mode="bilinear", align_corners=False, antialias=True
    )
    if images.dtype == torch.uint8:
        return resized.round_().clamp_(0, 255).to(torch.uint8)
    return resized.to(images.dtype)


def render(recipes: TobiasRecipes, images, masks, *, cell_px: Optional[int] = None):
    """The Tobias images of ``recipes``: (T, C, H, W), dtype of ``images``.

    images: (N, C, H, W) tensor, the data set the recipes' ids point into; masks: (N, g, g) bool
    (from :func:`object_masks`). The images are resized to g·cell_px square, swapped with
    :func:`swap_backgrounds` and resized back to H × W; a recipe without partner gives its base
    image exactly.
    """
    import torch

    masks = _as_mask_tensor(masks, images.device)
    if masks.shape[0] != images.shape[0]:
        raise InputError(f"{masks.shape[0]} masks for {images.shape[0]} images")
    grid = masks.shape[-1]
    side = grid * (cell_px or default_cell_px(grid))
    base = torch.as_tensor(recipes.base, device=images.device)
    partner = torch.as_tensor(np.where(recipes.swapped, recipes.partner, recipes.base), device=images.device)
    working = resize_images(images, side, side)
    swapped = swap_backgrounds(
        working[base], masks[base], working[partner], masks[partner], recipes.key, recipes.swapped
    )
    back = resize_images(swapped, images.shape[-2], images.shape[-1])
    keep = torch.as_tensor(recipes.swapped, device=images.device).reshape(-1, 1, 1, 1)
    return torch.where(keep, back, images[base])


@dataclass
class TobiasImages:
    """Output of :func:`augment`. images: (N, C, H, W), row i made from base image i (its label
    is image i's label); recipes: how each row was made (regenerate with :func:`render`)."""

    images: object
    recipes: TobiasRecipes


def augment(
    images,
    masks,
    partners=None,
    *,
    bg_prob: float = 1.0,
    seed: int = 0,
    cell_px: Optional[int] = None,
) -> TobiasImages:
    """Tobias augmentation of every image: row i of the result is a Tobias image of image i.

    images: (N, C, H, W) uint8/float tensor; masks: (N, g, g) bool foreground masks of them.
    partners: (N,) int64 ids into ``images`` giving each image's partner; default: drawn
    uniformly from the N images. With probability ``bg_prob`` image i takes its partner's
    background (otherwise it is returned unchanged); ``seed`` fixes every draw
    (:func:`draw_recipes`). ``cell_px``: side of a swap cell in pixels (default round(224/g)).
    """
    recipes = draw_recipes(
        np.arange(images.shape[0], dtype=np.int64), int(images.shape[0]),
        bg_prob=bg_prob, seed=seed, partners=partners,
    )
    return TobiasImages(render(recipes, images, masks, cell_px=cell_px), recipes)
