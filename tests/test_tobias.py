"""Tobias background swap (docs/method.md §5): masks, recipes, the batched swap against a per-image reference."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest_data import digits_arrays
from PIL import Image

from dqkernels.v2 import tobias

PHOTO_NAMES = ("astronaut", "coffee", "chelsea", "rocket", "camera")


def photo_batch(side: int) -> torch.Tensor:
    """scikit-image sample photos resized to side × side: (5, 3, side, side) uint8."""
    import skimage.data

    photos = [
        np.asarray(Image.fromarray(getattr(skimage.data, name)()).convert("RGB").resize((side, side)))
        for name in PHOTO_NAMES
    ]
    return torch.from_numpy(np.stack(photos)).permute(0, 3, 1, 2).contiguous()


def digit_batch(count: int = 20, side: int = 32) -> torch.Tensor:
    """The first ``count`` scikit-learn digits, side × side RGB: (count, 3, side, side) uint8."""
    images, _ = digits_arrays(count, size=side)
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()


@pytest.fixture(scope="module")
def photos():
    """Five 64 px photos and their 4×4 masks from the seeded random ResNet-50 at 224 px."""
    images = photo_batch(64)
    return images, tobias.object_masks(images, seed=0)


@pytest.fixture(scope="module")
def digits():
    """Twenty 32 px digits and their 4×4 masks (mask model at 64 px input)."""
    images = digit_batch()
    return images, tobias.object_masks(images, seed=0, input_px=64)


def cell(image, cell_id: int, grid: int):
    """Pixels of cell ``cell_id`` (raster order) of a (C, S, S) array."""
    side = image.shape[-1] // grid
    row, col = divmod(cell_id, grid)
    return image[:, row * side : (row + 1) * side, col * side : (col + 1) * side]


def reference_swap(base, base_mask, partner, partner_mask, key: int):
    """One Tobias image by plain loops over cells: (C, S, S) numpy arrays, (g, g) bool masks."""
    grid = base_mask.shape[0]
    base_background = [c for c in range(grid * grid) if not base_mask.flat[c]]
    partner_background = [c for c in range(grid * grid) if not partner_mask.flat[c]]
    permutation = tobias.background_permutations([key], len(base_background))[0]
    out = base.copy()
    for rank, target in enumerate(base_background):
        cell(out, target, grid)[...] = cell(partner, partner_background[permutation[rank]], grid)
    return out


def reference_augment(images, masks, recipes, cell_px: int):
    """Per-image reference of ``tobias.render``: resize, loop-swap, resize back, one image at a time."""
    side = masks.shape[-1] * cell_px
    height, width = images.shape[-2:]
    out = []
    for base, partner, key in zip(recipes.base, recipes.partner, recipes.key):
        if partner == tobias.NO_PARTNER:
            out.append(images[base])
            continue
        base_work = tobias.resize_images(images[base : base + 1], side, side)[0].numpy()
        partner_work = tobias.resize_images(images[partner : partner + 1], side, side)[0].numpy()
        swapped = reference_swap(base_work, masks[base], partner_work, masks[partner], int(key))
        out.append(tobias.resize_images(torch.from_numpy(swapped)[None], height, width)[0])
    return torch.stack(out)


def test_object_masks_are_the_top_half_of_tobias_cell_scores(photos):
    images, masks = photos
    assert masks.shape == (5, 4, 4) and masks.dtype == bool
    assert (masks.reshape(5, -1).sum(axis=1) == 8).all()
    # docs/method.md §5: children up to the last stage, max-pool 2x2 stride 2 padding 1, channel sum, top half.
    model = tobias.random_mask_model(seed=0)
    trunk = torch.nn.Sequential(*list(model.children())[:-2])
    inputs = F.interpolate(images.float() / 255, size=(224, 224), mode="bilinear", antialias=True)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.inference_mode():
        feature_map = trunk((inputs - mean) / std)
    assert feature_map.shape == (5, 2048, 7, 7)
    scores = F.max_pool2d(feature_map, 2, stride=2, padding=1).sum(dim=1).reshape(5, 16)
    top_half = np.argsort(-scores.numpy(), axis=1, kind="stable")[:, :8]
    expected = np.zeros((5, 16), dtype=bool)
    np.put_along_axis(expected, top_half, True, axis=1)
    np.testing.assert_array_equal(masks.reshape(5, 16), expected)


def test_masks_from_scores_breaks_ties_by_raster_index_and_handles_odd_grids():
    scores = torch.tensor([[[1.0, 1.0], [1.0, 0.0]], [[0.0, 2.0], [3.0, 2.0]]])
    assert tobias.masks_from_scores(scores).tolist() == [
        [[True, True], [False, False]], [[False, True], [True, False]],
    ]
    odd = tobias.masks_from_scores(torch.arange(9.0).reshape(1, 3, 3))
    assert odd.sum() == 5 and odd.reshape(-1)[4:].all()  # ceil(9/2) highest cells


def test_other_grids_pool_the_last_feature_map_adaptively(digits):
    images, _ = digits
    masks = tobias.object_masks(images[:4], grid=7, input_px=64)
    assert masks.shape == (4, 7, 7) and (masks.reshape(4, -1).sum(axis=1) == 25).all()
    with pytest.raises(ValueError, match="grid"):
        tobias.object_masks(images[:2], grid=0)


@pytest.mark.parametrize("data", ["photos", "digits"])
def test_swap_keeps_base_foreground_and_moves_partner_background(data, request):
    images, masks = request.getfixturevalue(data)
    cell_px = images.shape[-1] // 4  # swap at the images' own size: no resampling
    result = tobias.augment(images, masks, bg_prob=1.0, seed=3, cell_px=cell_px)
    recipes = result.recipes
    assert recipes.swapped.all() and np.array_equal(recipes.base, np.arange(len(images)))
    differs = 0
    for row, (partner, key) in enumerate(zip(recipes.partner, recipes.key)):
        out, base, donor = result.images[row].numpy(), images[row].numpy(), images[partner].numpy()
        foreground = np.flatnonzero(masks[row].reshape(-1))
        background = np.flatnonzero(~masks[row].reshape(-1))
        donor_background = np.flatnonzero(~masks[partner].reshape(-1))
        for c in foreground:
            np.testing.assert_array_equal(cell(out, c, 4), cell(base, c, 4))
        permutation = tobias.background_permutations([key], len(background))[0]
        assert sorted(permutation) == list(range(len(background)))
        for rank, c in enumerate(background):
            np.testing.assert_array_equal(cell(out, c, 4), cell(donor, donor_background[permutation[rank]], 4))
        differs += int(not np.array_equal(out, base))
    assert differs >= len(images) - 1  # a swap changes the image unless it drew itself as partner


@pytest.mark.parametrize(
    "data, side, cell_px", [("photos", 64, 16), ("photos", 48, 16), ("digits", 32, 8), ("digits", 32, 5)]
)
def test_batched_augment_equals_per_image_reference(data, side, cell_px, request):
    images, masks = request.getfixturevalue(data)
    images = tobias.resize_images(images, side, side)
    result = tobias.augment(images, masks, bg_prob=0.7, seed=11, cell_px=cell_px)
    assert 0 < result.recipes.swapped.sum() < len(images)  # both kinds of row are checked
    expected = reference_augment(images, masks, result.recipes, cell_px)
    assert result.images.dtype == images.dtype and result.images.shape == images.shape
    torch.testing.assert_close(result.images, expected, rtol=0, atol=0)


@pytest.mark.parametrize("cell_px", [None, 16])
def test_bg_prob_zero_is_the_identity(photos, cell_px):
    images, masks = photos
    result = tobias.augment(images, masks, bg_prob=0.0, seed=5, cell_px=cell_px)
    assert not result.recipes.swapped.any()
    assert torch.equal(result.images, images)


def test_recipes_regenerate_every_image_alone_or_in_any_order(photos):
    images, masks = photos
    result = tobias.augment(images, masks, seed=2, cell_px=12)  # 48 px swap: resampled both ways
    assert torch.equal(tobias.render(result.recipes, images, masks, cell_px=12), result.images)
    reversed_rows = np.arange(len(images))[::-1].copy()
    assert torch.equal(
        tobias.render(result.recipes.take(reversed_rows), images, masks, cell_px=12), result.images[reversed_rows]
    )
    for row in range(len(images)):
        alone = tobias.render(result.recipes.take([row]), images, masks, cell_px=12)
        assert torch.equal(alone[0], result.images[row])


def test_augment_is_deterministic_given_its_seed(digits):
    images, masks = digits
    first = tobias.augment(images, masks, seed=7, cell_px=8)
    again = tobias.augment(images, masks, seed=7, cell_px=8)
    other = tobias.augment(images, masks, seed=8, cell_px=8)
    assert torch.equal(first.images, again.images)
    assert not np.array_equal(first.recipes.key, other.recipes.key)
    assert not torch.equal(first.images, other.images)


def test_explicit_partners_are_used(digits):
    images, masks = digits
    partners = np.roll(np.arange(len(images)), 1)
    result = tobias.augment(images, masks, partners, seed=0, cell_px=8)
    assert np.array_equal(result.recipes.partner, partners)


def test_background_permutations_depend_on_the_key_only():
    keys = np.array([0, 1, 2**62, 12345], dtype=np.int64)
    batch = tobias.background_permutations(keys, 12)
    for row, key in enumerate(keys):
        assert sorted(batch[row]) == list(range(12))
        assert np.array_equal(tobias.background_permutations([key], 12)[0], batch[row])
    assert len({tuple(row) for row in batch}) == len(keys)


@pytest.mark.parametrize("mix, counts", [(0.0, set()), (0.5, {1}), (1.0, {1}), (1.5, {1, 2}), (2.0, {2})])
def test_choose_bases_spreads_tobias_images_over_the_originals(mix, counts):
    bases = tobias.choose_bases(10, mix, seed=4)
    assert bases.dtype == np.int64 and len(bases) == round(mix * 10)
    assert np.all(np.diff(bases) >= 0)
    assert set(np.bincount(bases, minlength=10)[np.unique(bases)]) == counts
    if mix <= 1:
        assert len(np.unique(bases)) == len(bases)
    with pytest.raises(ValueError, match="mix"):
        tobias.choose_bases(10, -0.5)


def test_bad_recipes_and_masks_are_rejected(digits):
    images, masks = digits
    with pytest.raises(ValueError, match="bg_prob"):
        tobias.draw_recipes(np.arange(3), 3, bg_prob=1.5)
    with pytest.raises(ValueError, match="partners"):
        tobias.draw_recipes(np.arange(3), 3, partners=np.array([0, 1, 3]))
    with pytest.raises(ValueError, match="bases"):
        tobias.draw_recipes(np.array([5]), 3)
    uneven = masks.copy()
    uneven[0, 0, 0] = not uneven[0, 0, 0]
    with pytest.raises(ValueError, match="same number of foreground cells"):
        tobias.augment(images, uneven, seed=0, cell_px=8)
    with pytest.raises(ValueError, match="masks"):
        tobias.augment(images, masks[:5], seed=0, cell_px=8)


def test_early_trained_mask_model_is_trained_and_repeatable(digits):
    images, _ = digits
    labels = torch.arange(len(images)) % 10
    trained = tobias.train_mask_model(images[:9], labels[:9], epochs=1, batch_size=4, seed=1, input_px=32)
    again = tobias.train_mask_model(images[:9], labels[:9], epochs=1, batch_size=4, seed=1, input_px=32)
    untrained = tobias.random_mask_model(seed=1, num_classes=10)
    assert not trained.training
    first_conv = trained.conv1.weight
    assert torch.equal(first_conv, again.conv1.weight)
    assert not torch.equal(first_conv, untrained.conv1.weight)
    masks = tobias.object_masks(images[:4], trained, input_px=64)
    assert masks.shape == (4, 4, 4) and (masks.reshape(4, -1).sum(axis=1) == 8).all()
    with pytest.raises(ValueError, match="labels"):
        tobias.train_mask_model(images[:4], labels[:3], input_px=64)
