"""The official MAE (He et al., 2022) rebuilding full images from a patch store (docs/method.md §4).

    mae = load_mae("mae_visualize_vit_large.pth", arch="large")     # strict, weights only
    images = mae.reconstruct(PatchStore("patches/").batch([0, 1]))  # (2, H, W, 3) uint8
    reconstruct_store("patches/", "mae_visualize_vit_large.pth", "images/")  # an ImageFolder tree

The architecture and the state-dict keys are MAE's own (``models_mae.py``), built from timm's
``Block`` and ``PatchEmbed``; the fixed position embeddings follow MAE's
``get_2d_sincos_pos_embed`` layout (the first half of the channels encodes the column, the second
the row — timm's own sin-cos helper orders them differently).

Reconstruction works on whole batches: the encoder sees only the kept patches (images with the
same number K of kept patches run together, one group per distinct K), the decoder fills the
dropped slots with the mask token, and the prediction is pasted under the kept patches in
normalised space, x·(1 − m) + ŷ·m with m = 1 on dropped patches, then de-normalised, clamped and
rounded to uint8 — kept patches come back bit-identical. Images whose patch grid matches the
MAE's but whose size is not 224 are fed to it patch by patch resized to its patch size, and its
prediction is resized back to the images' size before the paste. On CUDA the network runs under
float16 autocast.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from dqkernels.core.atomic import staged_directory
from dqkernels.core.errors import InputError
from dqkernels.pixel.patch_store import (
    PatchBatch,
    PatchGeometry,
    PatchStore,
    check_empty_destination,
    patchify,
    unpatchify,
)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
SAMPLES_FILE = "samples.jsonl"


@dataclass(frozen=True)
class MAEConfig:
    """Sizes of an MAE: encoder ViT (``embed_dim``, ``depth``, ``num_heads``) and decoder."""

    patch_size: int
    embed_dim: int
    depth: int
    num_heads: int
    decoder_embed_dim: int = 512
    decoder_depth: int = 8
    decoder_num_heads: int = 16
    mlp_ratio: float = 4.0
    img_size: int = 224

    @property
    def grid_size(self) -> int:
        """Patches per side of the MAE's input image."""
        return self.img_size // self.patch_size


MAE_ARCHS = {
    "base": MAEConfig(patch_size=16, embed_dim=768, depth=12, num_heads=12),
    "large": MAEConfig(patch_size=16, embed_dim=1024, depth=24, num_heads=16),
    "huge": MAEConfig(patch_size=14, embed_dim=1280, depth=32, num_heads=16),
}


def mae_sincos_pos_embed(embed_dim: int, grid_size: int, cls_token: bool = True) -> torch.Tensor:
    """MAE's fixed 2-D sin-cos position embedding: (grid_size² [+1], embed_dim) float32.

    Row p = r·grid_size + c (row-major patches; with ``cls_token`` a zero row comes first) holds
    [sin(c·ω), cos(c·ω), sin(r·ω), cos(r·ω)] with ω_i = 10000^(−i/(embed_dim/4)),
    i < embed_dim/4, computed in float64.
    """
    if embed_dim % 4:
        raise InputError(f"embed_dim must be a multiple of 4, got {embed_dim}")
    quarter = embed_dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    positions = torch.arange(grid_size, dtype=torch.float64)
    rows = positions.repeat_interleave(grid_size)[:, None] * omega
    cols = positions.repeat(grid_size)[:, None] * omega
    embedding = torch.cat([cols.sin(), cols.cos(), rows.sin(), rows.cos()], dim=1)
    if cls_token:
        embedding = torch.cat([torch.zeros(1, embed_dim, dtype=torch.float64), embedding])
    return embedding.float()


def resolve_config(arch: Union[MAEConfig, str]) -> MAEConfig:
    """The :class:`MAEConfig` of a name in ``MAE_ARCHS`` (or the config itself)."""
    if isinstance(arch, MAEConfig):
        return arch
    if arch not in MAE_ARCHS:
        raise InputError(f"arch must be one of {tuple(MAE_ARCHS)}, got {arch!r}")
    return MAE_ARCHS[arch]


def check_geometry(config: MAEConfig, geometry: PatchGeometry) -> None:
    """Raise ValueError unless images of ``geometry`` have the patch grid of an MAE of ``config``."""
    grid = config.grid_size
    if geometry.grid != (grid, grid) or geometry.channels != 3:
        raise InputError(
            f"images of {geometry.height}x{geometry.width} pixels in {geometry.patch}-pixel patches "
            f"({geometry.grid[0]}x{geometry.grid[1]} patches, {geometry.channels} channels) do not fit "
            f"this MAE's {grid}x{grid} grid of RGB patches; quantize with grid {grid}"
        )


class MaskedAutoencoder(nn.Module):
    """MAE with MAE's own module names, so an official checkpoint loads strictly.

    config: an :class:`MAEConfig` or a name in ``MAE_ARCHS``. device: where to create the
    weights; on "meta" they are left uninitialised (to be loaded), otherwise they are initialised
    as MAE does (sin-cos position embeddings, xavier-uniform linear layers, N(0, 0.02) tokens).
    """

    def __init__(self, config: Union[MAEConfig, str] = "large", device=None):
        super().__init__()
        from timm.models.vision_transformer import Block, PatchEmbed

        self.config = config = resolve_config(config)
        norm_layer = partial(nn.LayerNorm, eps=1e-6)
        num_patches = config.grid_size**2
        dim, decoder_dim = config.embed_dim, config.decoder_embed_dim
        self.patch_embed = PatchEmbed(config.img_size, config.patch_size, 3, dim, device=device)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim, device=device))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, dim, device=device), requires_grad=False)
        self.blocks = nn.ModuleList(
            Block(dim, config.num_heads, config.mlp_ratio, qkv_bias=True, norm_layer=norm_layer, device=device)
            for _ in range(config.depth)
        )
        self.norm = norm_layer(dim, device=device)
        self.decoder_embed = nn.Linear(dim, decoder_dim, bias=True, device=device)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_dim, device=device))
        self.decoder_pos_embed = nn.Parameter(
            torch.zeros(1, num_patches + 1, decoder_dim, device=device), requires_grad=False
        )
        self.decoder_blocks = nn.ModuleList(
            Block(decoder_dim, config.decoder_num_heads, config.mlp_ratio, qkv_bias=True, norm_layer=norm_layer,
                  device=device)
            for _ in range(config.decoder_depth)
        )
        self.decoder_norm = norm_layer(decoder_dim, device=device)
        self.decoder_pred = nn.Linear(decoder_dim, config.patch_size**2 * 3, bias=True, device=device)
        if self.pos_embed.device.type != "meta":
            self._initialize_weights()
        self.eval()

    def _initialize_weights(self) -> None:
        grid = self.config.grid_size
        with torch.no_grad():
            self.pos_embed.copy_(mae_sincos_pos_embed(self.config.embed_dim, grid)[None])
            self.decoder_pos_embed.copy_(mae_sincos_pos_embed(self.config.decoder_embed_dim, grid)[None])
            patch_weight = self.patch_embed.proj.weight
            nn.init.xavier_uniform_(patch_weight.view(patch_weight.shape[0], -1))
            nn.init.normal_(self.cls_token, std=0.02)
            nn.init.normal_(self.mask_token, std=0.02)
            for module in self.modules():
                if isinstance(module, nn.Linear):
                    nn.init.xavier_uniform_(module.weight)
                    nn.init.zeros_(module.bias)
                elif isinstance(module, nn.LayerNorm):
                    nn.init.ones_(module.weight)
                    nn.init.zeros_(module.bias)

    # ----------------------------------------------------------------------- network

    def encode(self, kept_patches: torch.Tensor, ids_keep: torch.Tensor) -> torch.Tensor:
        """Encoder output (B, 1 + K, embed_dim) for K kept patches per image.

        kept_patches: (B, K, patch²·3) normalised pixels in MAE's patch layout.
        ids_keep: (B, K) int64 grid positions of those patches.
        """
        proj = self.patch_embed.proj  # the patch convolution, applied to the kept patches only
        patch_weight = proj.weight.permute(0, 2, 3, 1).reshape(proj.weight.shape[0], -1)
        tokens = F.linear(kept_patches, patch_weight, proj.bias) + self.pos_embed[0, 1:][ids_keep]
        cls_token = (self.cls_token + self.pos_embed[:, :1]).expand(tokens.shape[0], -1, -1)
        hidden = torch.cat([cls_token.to(tokens.dtype), tokens], dim=1)
        for block in self.blocks:
            hidden = block(hidden)
        return self.norm(hidden)

    def decode(self, latent: torch.Tensor, ids_keep: torch.Tensor) -> torch.Tensor:
        """Predicted patches (B, L, patch²·3), normalised, from the encoder output (B, 1 + K, D)."""
        hidden = self.decoder_embed(latent)
        batch, _, width = hidden.shape
        num_patches = self.config.grid_size**2
        slots = self.mask_token.to(hidden.dtype).expand(batch, num_patches, width)
        slots = slots.scatter(1, ids_keep[..., None].expand(-1, -1, width), hidden[:, 1:])
        hidden = torch.cat([hidden[:, :1], slots], dim=1) + self.decoder_pos_embed
        for block in self.decoder_blocks:
            hidden = block(hidden)
        return self.decoder_pred(self.decoder_norm(hidden))[:, 1:]

    def predict(self, patches: torch.Tensor, keep_mask: torch.Tensor) -> torch.Tensor:
        """MAE prediction (B, L, patch²·3) float32 of every patch slot.

        patches: (B, L, patch²·3) normalised pixels (values of dropped slots are ignored).
        keep_mask: (B, L) bool. Images are grouped by their number of kept patches.
        """
        keep_counts = keep_mask.sum(dim=1)
        predicted = torch.empty(patches.shape, dtype=torch.float32, device=patches.device)
        for kept in torch.unique(keep_counts).tolist():
            rows = torch.nonzero(keep_counts == kept).squeeze(1)
            ids_keep = torch.nonzero(keep_mask[rows])[:, 1].view(rows.shape[0], kept)
            kept_patches = patches[rows].gather(1, ids_keep[..., None].expand(-1, -1, patches.shape[2]))
            predicted[rows] = self.decode(self.encode(kept_patches, ids_keep), ids_keep).float()
        return predicted

    # ----------------------------------------------------------------------- reconstruction

    def check_geometry(self, geometry: PatchGeometry) -> None:
        """Raise ValueError unless images of ``geometry`` have this MAE's patch grid."""
        check_geometry(self.config, geometry)

    @torch.inference_mode()
    def reconstruct(self, batch: PatchBatch, amp: Optional[bool] = None) -> torch.Tensor:
        """Full images (B, H, W, 3) uint8 on the CPU from a dense batch of a patch store.

        Kept patches are returned unchanged; dropped ones come from the MAE. amp: float16
        autocast; default on CUDA only.
        """
        geometry = batch.geometry
        self.check_geometry(geometry)
        device = self.pos_embed.device
        if amp is None:
            amp = device.type == "cuda"
        mae_patch, image_patch = self.config.patch_size, geometry.patch
        pixels_per_patch = image_patch * image_patch
        mean = torch.tensor(IMAGENET_MEAN, device=device).repeat(pixels_per_patch)  # (P,): layout (p, q, c)
        std = torch.tensor(IMAGENET_STD, device=device).repeat(pixels_per_patch)
        patches = torch.as_tensor(batch.patches).to(device)
        keep_mask = torch.as_tensor(batch.keep_mask).to(device)
        normalised = (patches.float() / 255.0 - mean) / std
        mae_input = normalised
        if image_patch != mae_patch:
            mae_input = _resize_patches(normalised, image_patch, mae_patch)
        with torch.autocast(device_type=device.type, dtype=torch.float16, enabled=amp):
            predicted = self.predict(mae_input, keep_mask)
        if image_patch != mae_patch:
            size = self.config.img_size
            full = unpatchify(predicted, PatchGeometry(size, size, mae_patch)).permute(0, 3, 1, 2)
            full = F.interpolate(full, size=(geometry.height, geometry.width), mode="bilinear",
                                 align_corners=False, antialias=True)
            predicted = patchify(full.permute(0, 2, 3, 1), image_patch)
        dropped = (~keep_mask)[..., None].float()
        pasted = normalised * (1 - dropped) + predicted * dropped
        rounded = ((pasted * std + mean).clamp(0, 1) * 255).round().to(torch.uint8)
        return unpatchify(rounded, geometry).cpu()


def _resize_patches(patches: torch.Tensor, size: int, new_size: int) -> torch.Tensor:
    """(B, L, size²·3) patches → (B, L, new_size²·3), each patch resized on its own (bilinear)."""
    batch, num_patches, _ = patches.shape
    square = patches.reshape(batch * num_patches, size, size, 3).permute(0, 3, 1, 2)
    resized = F.interpolate(square, size=(new_size, new_size), mode="bilinear", align_corners=False, antialias=True)
    return resized.permute(0, 2, 3, 1).reshape(batch, num_patches, new_size * new_size * 3)


def load_mae(checkpoint: str | os.PathLike, arch: Union[MAEConfig, str] = "large", device=None) -> MaskedAutoencoder:
    """An MAE with the weights of an official checkpoint file, loaded strictly, in eval mode.

    checkpoint: a file saved by MAE (``{"model": state_dict}``, e.g. mae_visualize_vit_large.pth)
        or a bare state dict; read with ``torch.load(weights_only=True)``. Every key and shape must
        match ``arch`` and its position embeddings must be MAE's fixed sin-cos ones, else
        ValueError. Reconstruction needs the decoder: encoder-only pre-training checkpoints are
        refused.
    device: "cpu", "cuda" or "cuda:N"; default CUDA when available.
    """
    from dqkernels.features.image import _load_state_dict_strictly, resolve_device

    config = resolve_config(arch)
    path = str(checkpoint)
    if not os.path.isfile(path):
        raise InputError(f"checkpoint {path!r} does not exist")
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # a corrupt or foreign file can fail anywhere inside the unpickler
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise InputError(f"cannot read checkpoint {path!r}: {first_line}") from None
    state_dict = loaded.get("model", loaded) if isinstance(loaded, dict) else None
    if not isinstance(state_dict, dict) or not all(isinstance(value, torch.Tensor) for value in state_dict.values()):
        raise InputError(f"checkpoint {path!r} holds no MAE state dict (expected {{'model': state_dict}})")
    if "blocks.0.attn.qkv.weight" in state_dict and "decoder_pred.weight" not in state_dict:
        raise InputError(f"checkpoint {path!r} holds an MAE encoder only; reconstruction needs the decoder "
                         "too (MAE's 'visualize' checkpoints)")
    model = MaskedAutoencoder(config, device="meta").to_empty(device="cpu")
    _load_state_dict_strictly(model, state_dict, f"MAE {arch if isinstance(arch, str) else config}", path)
    for name, dim in (("pos_embed", config.embed_dim), ("decoder_pos_embed", config.decoder_embed_dim)):
        error = (getattr(model, name)[0] - mae_sincos_pos_embed(dim, config.grid_size)).abs().max().item()
        if error > 1e-5:
            raise InputError(f"checkpoint {path!r}: {name} is not MAE's fixed 2-D sin-cos embedding "
                             f"(max difference {error:.3g})")
    return model.to(resolve_device(device)).eval()


class ReconstructedImages(Dataset):
    """The images of a patch store, rebuilt by an MAE when they are read.

    Item i: ``(image, label)`` — or only ``image`` when the store has no labels — where image is
    the i-th stored image as a PIL RGB image passed through ``transform`` (if any). A DataLoader
    fetches a whole batch through ``__getitems__``, so the MAE runs once per batch; with the MAE on
    a GPU keep ``num_workers=0``.
    """

    def __init__(self, store: Union[PatchStore, str, os.PathLike], mae: MaskedAutoencoder, transform=None):
        self.store = store if isinstance(store, PatchStore) else PatchStore(store)
        mae.check_geometry(self.store.geometry)
        self.mae = mae
        self.transform = transform

    def __len__(self) -> int:
        return len(self.store)

    def __getitems__(self, positions) -> list:
        from PIL import Image

        batch = self.store.batch(list(positions))
        images = self.mae.reconstruct(batch).numpy()
        items = []
        for row, pixels in enumerate(images):
            image = Image.fromarray(pixels)
            if self.transform is not None:
                image = self.transform(image)
            items.append(image if batch.labels is None else (image, int(batch.labels[row])))
        return items

    def __getitem__(self, position: int):
        return self.__getitems__([position])[0]


def output_paths(store: PatchStore) -> list[str]:
    """Relative path of each stored image in a reconstructed ImageFolder tree.

    Image-folder stores keep each image's own relative path, with a .png suffix; array stores
    use ``<class>/<sample id>.png`` (class: its name, else its label, else "unlabelled").
    Raises ValueError when two images would land on the same path.
    """
    if store.items is not None:
        paths = [Path(item).with_suffix(".png").as_posix() for item in store.items]
    else:
        if store.labels is None:
            classes = ["unlabelled"] * len(store)
        elif store.class_names is not None:
            classes = [store.class_names[label] for label in store.labels]
        else:
            classes = [str(label) for label in store.labels]
        paths = [f"{name}/{sample_id}.png" for name, sample_id in zip(classes, store.sample_ids)]
    seen: dict[str, int] = {}
    for row, path in enumerate(paths):
        if path in seen:
            raise InputError(f"stored images {seen[path]} and {row} would both be written to {path!r}")
        seen[path] = row
    return paths


@dataclass
class ReconstructOutcome:
    """A reconstructed ImageFolder tree: where, how many images, their size, seconds spent."""

    path: Path
    count: int
    height: int
    width: int
    seconds: float


def reconstruct_store(store: str | os.PathLike, checkpoint: str | os.PathLike, out_dir: str | os.PathLike, *,
                      arch: Union[MAEConfig, str] = "large", batch_size: int = 64, device=None,
                      progress: Optional[Callable[[int, int], None]] = None) -> ReconstructOutcome:
    """Rebuild every image of a patch store with the MAE of ``checkpoint`` into a new ImageFolder tree.

    Images are written as PNG at the store's image size to ``out_dir/<path>`` (see
    :func:`output_paths`); ``out_dir/samples.jsonl`` maps every image explicitly: one JSON object
    per line with ``id`` (dataset id), ``path``, ``label`` and ``source`` (the original relative
    path, for image folders). ``out_dir`` must be missing or empty; it appears only when complete.
    progress: None, or a callable(done, total) told the images written after every batch.
    """
    from PIL import Image

    patch_store = PatchStore(store)
    out_dir = check_empty_destination(out_dir, "output directory")
    paths = output_paths(patch_store)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise InputError(f"batch_size must be a positive integer, got {batch_size!r}")
    check_geometry(resolve_config(arch), patch_store.geometry)  # before reading a large checkpoint
    mae = load_mae(checkpoint, arch, device)
    started = time.perf_counter()
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with staged_directory(out_dir) as staging:  # an empty directory there is replaced
        done = 0
        for batch in patch_store.batches(batch_size):
            for row, pixels in zip(batch.rows, mae.reconstruct(batch).numpy()):
                target = staging / paths[row]
                target.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(pixels).save(target)
            done += len(batch)
            if progress is not None:
                progress(done, len(patch_store))
        with open(staging / SAMPLES_FILE, "w", encoding="utf-8") as handle:
            for row, path in enumerate(paths):
                record = {
                    "id": int(patch_store.sample_ids[row]),
                    "path": path,
                    "label": int(patch_store.labels[row]) if patch_store.labels is not None else None,
                    "source": patch_store.items[row] if patch_store.items is not None else None,
                }
                handle.write(json.dumps(record) + "\n")
    geometry = patch_store.geometry
    return ReconstructOutcome(out_dir, len(patch_store), geometry.height, geometry.width,
                              time.perf_counter() - started)
