"""MAE reconstruction (docs/method.md §4): the official key layout and position embeddings, strict loading,
kept patches returned bit-identical, the official forward reproduced with K varying in a batch,
other image sizes, the on-the-fly Dataset and the ImageFolder writer. A tiny config keeps it fast."""

import functools
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from dqkernels.pixel.mae import (
    MAE_ARCHS,
    MAEConfig,
    MaskedAutoencoder,
    ReconstructedImages,
    load_mae,
    mae_sincos_pos_embed,
    reconstruct_store,
)
from dqkernels.pixel.patch_store import (
    PatchBatch,
    PatchGeometry,
    PatchStore,
    patchify,
    unpatchify,
    write_patch_store,
)

TINY = MAEConfig(patch_size=16, embed_dim=64, depth=2, num_heads=4, decoder_embed_dim=32, decoder_depth=2,
                 decoder_num_heads=4)
MEAN = torch.tensor([0.485, 0.456, 0.406])
STD = torch.tensor([0.229, 0.224, 0.225])


def numpy_mae_pos_embed(embed_dim, grid_size):
    """MAE's get_2d_sincos_pos_embed(embed_dim, grid_size, cls_token=True), as MAE writes it."""

    def one_dimension(dim, positions):
        omega = np.arange(dim // 2, dtype=np.float64)
        omega /= dim / 2.0
        omega = 1.0 / 10000**omega
        out = np.einsum("m,d->md", positions.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    grid_h = np.arange(grid_size, dtype=np.float32)
    grid_w = np.arange(grid_size, dtype=np.float32)
    grid = np.stack(np.meshgrid(grid_w, grid_h), axis=0).reshape(2, 1, grid_size, grid_size)
    embedding = np.concatenate(
        [one_dimension(embed_dim // 2, grid[0]), one_dimension(embed_dim // 2, grid[1])], axis=1
    )
    return np.concatenate([np.zeros([1, embed_dim]), embedding], axis=0)


def official_shapes(config):
    """{key: shape} of MAE's models_mae.MaskedAutoencoderViT state dict for ``config``."""
    patches = (224 // config.patch_size) ** 2
    dim, decoder_dim = config.embed_dim, config.decoder_embed_dim

    def block(prefix, width):
        hidden = int(width * config.mlp_ratio)
        return {
            f"{prefix}.norm1.weight": (width,), f"{prefix}.norm1.bias": (width,),
            f"{prefix}.attn.qkv.weight": (3 * width, width), f"{prefix}.attn.qkv.bias": (3 * width,),
            f"{prefix}.attn.proj.weight": (width, width), f"{prefix}.attn.proj.bias": (width,),
            f"{prefix}.norm2.weight": (width,), f"{prefix}.norm2.bias": (width,),
            f"{prefix}.mlp.fc1.weight": (hidden, width), f"{prefix}.mlp.fc1.bias": (hidden,),
            f"{prefix}.mlp.fc2.weight": (width, hidden), f"{prefix}.mlp.fc2.bias": (width,),
        }

    shapes = {
        "cls_token": (1, 1, dim), "pos_embed": (1, patches + 1, dim),
        "mask_token": (1, 1, decoder_dim), "decoder_pos_embed": (1, patches + 1, decoder_dim),
        "patch_embed.proj.weight": (dim, 3, config.patch_size, config.patch_size), "patch_embed.proj.bias": (dim,),
        "norm.weight": (dim,), "norm.bias": (dim,),
        "decoder_embed.weight": (decoder_dim, dim), "decoder_embed.bias": (decoder_dim,),
        "decoder_norm.weight": (decoder_dim,), "decoder_norm.bias": (decoder_dim,),
        "decoder_pred.weight": (config.patch_size**2 * 3, decoder_dim),
        "decoder_pred.bias": (config.patch_size**2 * 3,),
    }
    for index in range(config.depth):
        shapes.update(block(f"blocks.{index}", dim))
    for index in range(config.decoder_depth):
        shapes.update(block(f"decoder_blocks.{index}", decoder_dim))
    return shapes


def official_state_dict(config, seed=0):
    """A state dict with the official keys: random values of a sensible scale (outputs of unit
    variance, so that reconstructions vary), and MAE's fixed position embeddings."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in official_shapes(config).items():
        values = torch.randn(shape, generator=generator)
        if len(shape) > 1:
            state[key] = values / math.sqrt(math.prod(shape[1:]))
        else:
            state[key] = values * 0.1 + (1.0 if "norm" in key and key.endswith("weight") else 0.0)
    grid = 224 // config.patch_size
    state["pos_embed"] = torch.from_numpy(numpy_mae_pos_embed(config.embed_dim, grid)).float()[None]
    state["decoder_pos_embed"] = torch.from_numpy(numpy_mae_pos_embed(config.decoder_embed_dim, grid)).float()[None]
    return state


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("mae") / "tiny.pth"
    torch.save({"model": official_state_dict(TINY)}, path)
    return path


@pytest.fixture(scope="module")
def tiny_mae(tiny_checkpoint):
    return load_mae(tiny_checkpoint, TINY, device="cpu")


@functools.lru_cache(maxsize=None)
def photos_uint8(size=224):
    """Five scikit-image photos resized to size × size: (5, size, size, 3) uint8."""
    import skimage.data

    photos = []
    for name in ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry"):
        image = Image.fromarray(getattr(skimage.data, name)()).resize((size, size), Image.Resampling.BILINEAR)
        photos.append(np.asarray(image))
    return np.stack(photos)


def dense_batch(images, keep_mask, patch, labels=None):
    geometry = PatchGeometry(images.shape[1], images.shape[2], patch)
    patches = patchify(images, patch).copy()
    patches[~keep_mask] = 0
    count = images.shape[0]
    return PatchBatch(np.arange(count), np.arange(count), labels, patches, keep_mask, geometry)


def random_keep_mask(keep_counts, num_patches, seed):
    rng = np.random.default_rng(seed)
    keep_mask = np.zeros((len(keep_counts), num_patches), dtype=bool)
    for row, kept in enumerate(keep_counts):
        keep_mask[row, rng.choice(num_patches, size=kept, replace=False)] = True
    return keep_mask


def official_forward(model, images, keep_mask):
    """MAE's forward_encoder + forward_decoder, one image at a time, with the kept patches shuffled first."""
    outputs = []
    for image, keep in zip(images, torch.as_tensor(keep_mask)):
        x = model.patch_embed(image[None]) + model.pos_embed[:, 1:, :]
        ids_shuffle = torch.cat([torch.nonzero(keep)[:, 0], torch.nonzero(~keep)[:, 0]])[None]
        ids_restore = torch.argsort(ids_shuffle, dim=1)
        ids_keep = ids_shuffle[:, : int(keep.sum())]
        x = torch.gather(x, dim=1, index=ids_keep.unsqueeze(-1).repeat(1, 1, x.shape[2]))
        cls_token = model.cls_token + model.pos_embed[:, :1, :]
        x = torch.cat((cls_token.expand(x.shape[0], -1, -1), x), dim=1)
        for block in model.blocks:
            x = block(x)
        x = model.norm(x)
        x = model.decoder_embed(x)
        mask_tokens = model.mask_token.repeat(x.shape[0], ids_restore.shape[1] + 1 - x.shape[1], 1)
        x_ = torch.cat([x[:, 1:, :], mask_tokens], dim=1)
        x_ = torch.gather(x_, dim=1, index=ids_restore.unsqueeze(-1).repeat(1, 1, x.shape[2]))
        x = torch.cat([x[:, :1, :], x_], dim=1) + model.decoder_pos_embed
        for block in model.decoder_blocks:
            x = block(x)
        outputs.append(model.decoder_pred(model.decoder_norm(x))[:, 1:, :])
    return torch.cat(outputs)


def normalised_nchw(images_uint8):
    pixels = torch.from_numpy(images_uint8).permute(0, 3, 1, 2).float() / 255
    return (pixels - MEAN[:, None, None]) / STD[:, None, None]


# --------------------------------------------------------------------------- architecture and loading


@pytest.mark.parametrize("embed_dim, grid_size", [(64, 14), (1024, 14), (512, 14), (1280, 16), (32, 4)])
def test_position_embedding_is_maes_layout(embed_dim, grid_size):
    expected = numpy_mae_pos_embed(embed_dim, grid_size).astype(np.float32)
    np.testing.assert_allclose(mae_sincos_pos_embed(embed_dim, grid_size).numpy(), expected, rtol=0, atol=1e-6)


def test_a_new_model_uses_maes_position_embeddings():
    model = MaskedAutoencoder(TINY)
    np.testing.assert_allclose(model.pos_embed[0].detach().numpy(), numpy_mae_pos_embed(64, 14), atol=1e-6)
    np.testing.assert_allclose(model.decoder_pos_embed[0].detach().numpy(), numpy_mae_pos_embed(32, 14), atol=1e-6)
    assert not model.pos_embed.requires_grad and not model.decoder_pos_embed.requires_grad


@pytest.mark.parametrize("arch, heads", [("base", 12), ("large", 16), ("huge", 16)])
def test_architectures_have_the_official_layout(arch, heads):
    model = MaskedAutoencoder(arch, device="meta")
    shapes = {key: tuple(value.shape) for key, value in model.state_dict().items()}
    assert shapes == official_shapes(MAE_ARCHS[arch])
    assert model.blocks[0].attn.num_heads == heads and model.decoder_blocks[0].attn.num_heads == 16
    norms = [m for m in model.modules() if isinstance(m, torch.nn.LayerNorm)]
    assert norms and all(norm.eps == 1e-6 for norm in norms)
    if arch == "large":
        assert (len(model.blocks), model.config.embed_dim, len(model.decoder_blocks)) == (24, 1024, 8)
        assert model.config.decoder_embed_dim == 512


def test_official_checkpoint_loads_strictly(tiny_checkpoint):
    model = load_mae(tiny_checkpoint, TINY, device="cpu")
    expected = official_state_dict(TINY)
    loaded = model.state_dict()
    assert sorted(loaded) == sorted(expected)
    assert all(torch.equal(loaded[key], expected[key]) for key in expected)
    assert not model.training


@pytest.fixture
def foreign_checkpoints(tmp_path):
    """Checkpoints that must not load as TINY, with the error each must give."""
    state = official_state_dict(TINY)
    deeper = MAEConfig(patch_size=16, embed_dim=64, depth=3, num_heads=4, decoder_embed_dim=32,
                       decoder_depth=2, decoder_num_heads=4)
    cases = {
        "another architecture": ({"model": official_state_dict(deeper)}, "does not fit MAE .*unexpected keys"),
        "wider": ({"model": official_state_dict(MAEConfig(16, 96, 2, 4, 32, 2, 4))}, "shape mismatch for"),
        "encoder only": ({"model": {k: v for k, v in state.items() if not k.startswith(("decoder", "mask"))}},
                         "encoder only"),
        "extra key": ({"model": {**state, "head.weight": torch.zeros(3)}}, "1 unexpected keys \\(head.weight\\)"),
        "rows and columns swapped in the position embedding": (
            {"model": {**state, "pos_embed": state["pos_embed"].roll(32, dims=-1)}},
            "pos_embed is not MAE's fixed 2-D sin-cos embedding"),
        "not a state dict": (torch.zeros(3), "holds no MAE state dict"),
    }
    paths = {}
    for name, (content, message) in cases.items():
        paths[name] = (tmp_path / f"{name.replace(' ', '_')}.pth", message)
        torch.save(content, paths[name][0])
    (tmp_path / "garbage.pth").write_bytes(b"not a checkpoint")
    paths["garbage"] = (tmp_path / "garbage.pth", "cannot read checkpoint")
    paths["missing"] = (tmp_path / "missing.pth", "does not exist")
    return paths


def test_foreign_checkpoints_are_refused(foreign_checkpoints):
    for path, message in foreign_checkpoints.values():
        with pytest.raises(ValueError, match=message):
            load_mae(path, TINY, device="cpu")
    with pytest.raises(ValueError, match="arch must be one of"):
        load_mae(foreign_checkpoints["extra key"][0], "gigantic", device="cpu")


# --------------------------------------------------------------------------- reconstruction


@pytest.mark.parametrize("size, patch", [(224, 16), (112, 8)])
def test_keeping_every_patch_returns_the_input_exactly(tiny_mae, size, patch):
    images = photos_uint8(size)
    batch = dense_batch(images, np.ones((5, 196), dtype=bool), patch)
    assert torch.equal(tiny_mae.reconstruct(batch), torch.from_numpy(images))


def test_reconstruction_matches_the_official_forward_with_k_varying(tiny_mae):
    images = photos_uint8(224)
    keep_mask = random_keep_mask([150, 196, 97, 150, 1], 196, seed=0)  # three groups by K
    batch = dense_batch(images, keep_mask, 16)
    normalised = normalised_nchw(images)
    with torch.no_grad():
        reference = official_forward(tiny_mae, normalised, keep_mask)
        predicted = tiny_mae.predict(patchify(normalised.permute(0, 2, 3, 1), 16), torch.from_numpy(keep_mask))
    torch.testing.assert_close(predicted, reference, rtol=1e-4, atol=1e-5)

    # the official paste, in normalised space, then de-normalised and rounded as save_image does
    mask = torch.from_numpy(~keep_mask).float()[..., None].expand(-1, -1, 768)
    mask_image = unpatchify(mask, PatchGeometry(224, 224, 16)).permute(0, 3, 1, 2)
    predicted_image = unpatchify(reference, PatchGeometry(224, 224, 16)).permute(0, 3, 1, 2)
    pasted = normalised * (1 - mask_image) + predicted_image * mask_image
    expected = ((pasted * STD[:, None, None] + MEAN[:, None, None]).clamp(0, 1) * 255).round().byte()

    rebuilt = tiny_mae.reconstruct(batch)
    assert rebuilt.shape == (5, 224, 224, 3) and rebuilt.dtype == torch.uint8
    difference = (rebuilt.int() - expected.permute(0, 2, 3, 1).int()).abs()
    assert difference.max() <= 1 and (difference > 0).float().mean() < 1e-3
    kept_in, kept_out = patchify(images, 16)[keep_mask], patchify(rebuilt.numpy(), 16)[keep_mask]
    assert np.array_equal(kept_out, kept_in)  # bit-identical
    dropped_out = patchify(rebuilt.numpy(), 16)[~keep_mask]
    assert dropped_out.any()  # filled by the MAE, not left black


def test_float16_autocast_keeps_the_kept_patches_exact(tiny_mae):
    images = photos_uint8(224)
    keep_mask = random_keep_mask([150, 196, 97, 150, 1], 196, seed=4)
    batch = dense_batch(images, keep_mask, 16)
    half, full = tiny_mae.reconstruct(batch, amp=True), tiny_mae.reconstruct(batch, amp=False)
    assert np.array_equal(patchify(half.numpy(), 16)[keep_mask], patchify(images, 16)[keep_mask])
    assert (half.int() - full.int()).abs().max() <= 4  # float16 network, float32 paste


def test_other_sizes_go_through_224_and_back(tiny_mae):
    images = photos_uint8(112)
    keep_mask = random_keep_mask([147, 147, 100, 196, 50], 196, seed=1)
    rebuilt = tiny_mae.reconstruct(dense_batch(images, keep_mask, 8)).numpy()
    assert rebuilt.shape == (5, 112, 112, 3)
    assert np.array_equal(patchify(rebuilt, 8)[keep_mask], patchify(images, 8)[keep_mask])

    # the MAE sees each kept 8-px patch resized to 16 px; its 224-px prediction is resized to 112
    kept_patches = torch.from_numpy(patchify(images, 8)).float().reshape(5 * 196, 8, 8, 3).permute(0, 3, 1, 2)
    upsized = torch.nn.functional.interpolate(kept_patches, size=(16, 16), mode="bilinear", antialias=True)
    upsized = upsized.permute(0, 2, 3, 1).reshape(5, 196, 768)
    image_224 = unpatchify(upsized, PatchGeometry(224, 224, 16)).permute(0, 3, 1, 2) / 255
    with torch.no_grad():
        predicted = official_forward(tiny_mae, (image_224 - MEAN[:, None, None]) / STD[:, None, None], keep_mask)
    predicted = unpatchify(predicted, PatchGeometry(224, 224, 16)).permute(0, 3, 1, 2)
    predicted = torch.nn.functional.interpolate(predicted, size=(112, 112), mode="bilinear", antialias=True)
    expected = ((predicted * STD[:, None, None] + MEAN[:, None, None]).clamp(0, 1) * 255).round().byte()
    expected = patchify(expected.permute(0, 2, 3, 1).numpy(), 8)[~keep_mask]
    assert np.abs(patchify(rebuilt, 8)[~keep_mask].astype(int) - expected).max() <= 1


def test_images_off_the_mae_grid_are_refused(tiny_mae):
    images = photos_uint8(224)
    with pytest.raises(ValueError, match="7x7 patches.*do not fit this MAE's 14x14 grid"):
        tiny_mae.reconstruct(dense_batch(images, np.ones((5, 49), dtype=bool), 32))


def test_dataset_reconstructs_a_batch_per_mae_pass(tmp_path, tiny_mae, monkeypatch):
    images = photos_uint8(224)
    keep_mask = random_keep_mask([147] * 5, 196, seed=2)
    write_patch_store(tmp_path / "store", images, keep_mask, [11, 12, 13, 14, 15], patch=16, labels=[4, 3, 2, 1, 0])
    expected = tiny_mae.reconstruct(PatchStore(tmp_path / "store").batch(slice(0, 5)))
    passes = []
    real_reconstruct = tiny_mae.reconstruct
    monkeypatch.setattr(tiny_mae, "reconstruct", lambda batch: passes.append(len(batch)) or real_reconstruct(batch))
    dataset = ReconstructedImages(tmp_path / "store", tiny_mae,
                                  transform=lambda image: torch.from_numpy(np.array(image)))
    assert len(dataset) == 5
    loaded = list(DataLoader(dataset, batch_size=3))
    assert passes == [3, 2]
    assert torch.equal(torch.cat([pixels for pixels, _ in loaded]), expected)
    assert torch.cat([labels for _, labels in loaded]).tolist() == [4, 3, 2, 1, 0]
    image, label = dataset[1]
    assert torch.equal(image, expected[1]) and label == 3


def test_reconstruct_store_writes_an_image_folder(tmp_path, tiny_checkpoint, tiny_mae):
    images = photos_uint8(224)[:3]
    keep_mask = random_keep_mask([147, 100, 196], 196, seed=3)
    items = ["space/astronaut.jpg", "drinks/coffee.jpeg", "cats/chelsea.png"]
    write_patch_store(tmp_path / "store", images, keep_mask, [40, 7, 23], patch=16, labels=[2, 1, 0], items=items,
                      class_names=["cats", "drinks", "space"])
    outcome = reconstruct_store(tmp_path / "store", tiny_checkpoint, tmp_path / "images", arch=TINY, batch_size=2,
                                device="cpu")
    assert outcome.count == 3 and (outcome.height, outcome.width) == (224, 224)
    written = sorted(p.relative_to(tmp_path / "images").as_posix() for p in (tmp_path / "images").rglob("*.png"))
    assert written == ["cats/chelsea.png", "drinks/coffee.png", "space/astronaut.png"]
    records = [json.loads(line) for line in (tmp_path / "images" / "samples.jsonl").read_text().splitlines()]
    assert [(r["id"], r["path"], r["label"], r["source"]) for r in records] == [
        (40, "space/astronaut.png", 2, "space/astronaut.jpg"),
        (7, "drinks/coffee.png", 1, "drinks/coffee.jpeg"),
        (23, "cats/chelsea.png", 0, "cats/chelsea.png"),
    ]
    expected = tiny_mae.reconstruct(PatchStore(tmp_path / "store").batch(slice(0, 3))).numpy()
    for row, record in enumerate(records):
        assert np.array_equal(np.asarray(Image.open(tmp_path / "images" / record["path"])), expected[row])


def test_reconstruct_store_refuses_clashing_names_and_leaves_nothing(tmp_path, tiny_checkpoint):
    images = photos_uint8(224)[:2]
    write_patch_store(tmp_path / "store", images, np.ones((2, 196), dtype=bool), [0, 1], patch=16,
                      items=["a/photo.jpg", "a/photo.png"])
    with pytest.raises(ValueError, match="stored images 0 and 1 would both be written to 'a/photo.png'"):
        reconstruct_store(tmp_path / "store", tiny_checkpoint, tmp_path / "images", arch=TINY, device="cpu")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["store"]
