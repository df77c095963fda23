"""The patch store: MAE's patch layout, an exact round trip (streamed, random access, written in one
go or batch by batch), and clear errors for bad geometry, bad arrays and damaged stores."""

import json

import numpy as np
import pytest
import torch
from conftest_data import digits_arrays

from dqkernels.pixel.patch_store import (
    PatchGeometry,
    PatchStore,
    PatchStoreWriter,
    patchify,
    unpatchify,
    write_patch_store,
)


def mae_patchify(images, patch):
    """MAE's own patchify of (N, 3, H, W) images: einsum 'nchpwq->nhwpqc'."""
    count, _, height, width = images.shape
    blocks = images.reshape(count, 3, height // patch, patch, width // patch, patch)
    return torch.einsum("nchpwq->nhwpqc", blocks).reshape(count, -1, patch * patch * 3)


def test_patchify_is_maes_layout_and_unpatchify_inverts_it():
    images = torch.randint(0, 256, (3, 24, 40, 3), dtype=torch.uint8)
    patches = patchify(images, 8)
    assert patches.shape == (3, 15, 192)
    assert torch.equal(patches, mae_patchify(images.permute(0, 3, 1, 2), 8))
    assert torch.equal(unpatchify(patches, PatchGeometry(24, 40, 8)), images)
    assert np.array_equal(patchify(images.numpy(), 8), patches.numpy())  # numpy arrays alike
    assert np.array_equal(unpatchify(patches.numpy(), PatchGeometry(24, 40, 8)), images.numpy())


@pytest.fixture
def digits_store_inputs(rng):
    """12 digit images (32×32 RGB, 16 patches of 8 px), a keep mask with a different K per image."""
    images, labels = digits_arrays(12, size=32)
    keep_mask = np.zeros((12, 16), dtype=bool)
    for row, kept in enumerate([16, 12, 12, 1, 7, 0, 16, 9, 3, 12, 5, 11]):
        keep_mask[row, rng.choice(16, size=kept, replace=False)] = True
    sample_ids = np.sort(rng.choice(1000, size=12, replace=False))
    items = [f"{label}/{sample_id:04d}.png" for label, sample_id in zip(labels, sample_ids)]
    return images, keep_mask, sample_ids, labels, items


def expected_dense(images, keep_mask, patch):
    dense = patchify(images, patch).copy()
    dense[~keep_mask] = 0
    return dense


def test_store_round_trips_exactly(tmp_path, digits_store_inputs):
    images, keep_mask, sample_ids, labels, items = digits_store_inputs
    class_names = [f"digit-{d}" for d in range(10)]
    write_patch_store(tmp_path / "store", images, keep_mask, sample_ids, patch=8, labels=labels, items=items,
                      class_names=class_names, meta={"source": {"note": "digits"}})
    store = PatchStore(tmp_path / "store")
    assert len(store) == 12 and store.geometry == PatchGeometry(32, 32, 8, 3)
    assert store.keep_counts.tolist() == keep_mask.sum(axis=1).tolist()
    assert store.items == items and store.class_names == class_names
    assert store.header["source"] == {"note": "digits"}
    assert store.header["bytes"] == {"images": 12 * 32 * 32 * 3, "patches": int(keep_mask.sum()) * 192}
    assert store.stored_bytes() == sum(p.stat().st_size for p in (tmp_path / "store").iterdir())

    streamed = list(store.batches(5))
    assert [len(batch) for batch in streamed] == [5, 5, 2]
    dense = expected_dense(images, keep_mask, 8)
    assert np.array_equal(np.concatenate([b.patches for b in streamed]), dense)
    assert np.array_equal(np.concatenate([b.keep_mask for b in streamed]), keep_mask)
    assert np.array_equal(np.concatenate([b.sample_ids for b in streamed]), sample_ids)
    assert np.array_equal(np.concatenate([b.labels for b in streamed]), labels)
    assert np.array_equal(np.concatenate([b.rows for b in streamed]), np.arange(12))

    picked = store.batch([9, 3, 5, 0])  # random access, out of order, with K = 0 and K = 1
    assert np.array_equal(picked.patches, dense[[9, 3, 5, 0]])
    assert np.array_equal(picked.keep_mask, keep_mask[[9, 3, 5, 0]])
    assert np.array_equal(picked.sample_ids, sample_ids[[9, 3, 5, 0]])
    rebuilt = store.batch(slice(0, 12)).images()
    pixel_mask = keep_mask.reshape(12, 4, 4).repeat(8, axis=1).repeat(8, axis=2)
    assert np.array_equal(rebuilt[pixel_mask], images[pixel_mask]) and not rebuilt[~pixel_mask].any()


def test_writing_batch_by_batch_gives_the_same_files(tmp_path, digits_store_inputs):
    images, keep_mask, sample_ids, labels, items = digits_store_inputs
    write_patch_store(tmp_path / "at_once", images, keep_mask, sample_ids, patch=8, labels=labels, items=items)
    (tmp_path / "batched").mkdir()  # an empty directory is a valid destination
    with PatchStoreWriter(tmp_path / "batched", PatchGeometry(32, 32, 8), 12, int(keep_mask.sum())) as writer:
        for start in (0, 4, 9):
            stop = {0: 4, 4: 9, 9: 12}[start]
            writer.append(images[start:stop], keep_mask[start:stop], sample_ids[start:stop], labels[start:stop],
                          items[start:stop])
    for name in ("patches.npy", "indices.npy", "offsets.npy", "sample_ids.npy", "labels.npy", "items.jsonl",
                 "header.json"):
        assert (tmp_path / "at_once" / name).read_bytes() == (tmp_path / "batched" / name).read_bytes(), name
    assert sorted(p.name for p in tmp_path.iterdir()) == ["at_once", "batched"]  # no staging left


def test_store_without_labels_or_items(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (3, 16, 16, 3), dtype=np.uint8)
    write_patch_store(tmp_path / "store", images, np.ones((3, 4), dtype=bool), [7, 8, 9], patch=8)
    store = PatchStore(tmp_path / "store")
    assert store.labels is None and store.items is None and store.class_names is None
    batch = store.batch(slice(0, 3))
    assert batch.labels is None and np.array_equal(batch.images(), images)
    assert sorted(store.header["files"]) == ["indices", "offsets", "patches", "sample_ids"]


def test_bad_geometry_and_arrays_are_refused(tmp_path, digits_store_inputs):
    images, keep_mask, sample_ids, labels, _ = digits_store_inputs
    with pytest.raises(ValueError, match="image size 30x32 is not a multiple of the patch size 8"):
        PatchGeometry(30, 32, 8)
    with pytest.raises(ValueError, match="patch must be a positive integer"):
        PatchGeometry(32, 32, 0)
    with pytest.raises(ValueError, match="not a multiple of the patch size 5"):
        write_patch_store(tmp_path / "a", images, keep_mask, sample_ids, patch=5)
    with PatchStoreWriter(tmp_path / "b", PatchGeometry(32, 32, 8), 12, int(keep_mask.sum())) as writer:
        with pytest.raises(ValueError, match=r"images must be uint8 of shape \(B, 32, 32, 3\)"):
            writer.append(images[:, :24, :24], keep_mask[:, :9], sample_ids)
        with pytest.raises(ValueError, match=r"images must be uint8"):
            writer.append(images.astype(np.float32), keep_mask, sample_ids)
        with pytest.raises(ValueError, match=r"keep_mask must be bool of shape \(12, 16\)"):
            writer.append(images, keep_mask[:, :8], sample_ids)
        with pytest.raises(ValueError, match="sample_ids must be integers"):
            writer.append(images, keep_mask, sample_ids[:3])
        writer.append(images[:6], keep_mask[:6], sample_ids[:6], labels[:6])
        with pytest.raises(ValueError, match="labels must be given for every batch or for none"):
            writer.append(images[6:], keep_mask[6:], sample_ids[6:])
        with pytest.raises(ValueError, match="opened for 12 images and .* patches; got 6 images"):
            writer.close()
    assert not (tmp_path / "b").exists()
    assert list(tmp_path.iterdir()) == []  # nothing half-written, no staging directory


def test_an_error_inside_the_writer_leaves_nothing(tmp_path, digits_store_inputs):
    images, keep_mask, sample_ids, _, _ = digits_store_inputs
    with pytest.raises(RuntimeError, match="decoding failed"):
        with PatchStoreWriter(tmp_path / "store", PatchGeometry(32, 32, 8), 12, int(keep_mask.sum())) as writer:
            writer.append(images[:4], keep_mask[:4], sample_ids[:4])
            raise RuntimeError("decoding failed")
    assert list(tmp_path.iterdir()) == []


def test_non_empty_destination_is_refused(tmp_path, digits_store_inputs):
    images, keep_mask, sample_ids, _, _ = digits_store_inputs
    (tmp_path / "store").mkdir()
    (tmp_path / "store" / "keep.txt").write_text("keep")
    with pytest.raises(ValueError, match="patch store .* already exists and is not empty"):
        write_patch_store(tmp_path / "store", images, keep_mask, sample_ids, patch=8)
    assert [p.name for p in (tmp_path / "store").iterdir()] == ["keep.txt"]


@pytest.fixture
def written_store(tmp_path, digits_store_inputs):
    images, keep_mask, sample_ids, labels, items = digits_store_inputs
    return write_patch_store(tmp_path / "store", images, keep_mask, sample_ids, patch=8, labels=labels, items=items)


def test_damaged_stores_give_clear_errors(tmp_path, written_store):
    with pytest.raises(ValueError, match="is not a directory"):
        PatchStore(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="is not a patch store: cannot read header.json"):
        PatchStore(tmp_path / "empty")

    header_path = written_store / "header.json"
    header = json.loads(header_path.read_text())
    header_path.write_text(json.dumps({**header, "format": "dqkernels.features"}))
    with pytest.raises(ValueError, match="is not a dqkernels.patches header"):
        PatchStore(written_store)
    header_path.write_text(json.dumps({**header, "version": 99}))
    with pytest.raises(ValueError, match="has version 99"):
        PatchStore(written_store)
    header_path.write_text(json.dumps(header))

    indices = np.load(written_store / "indices.npy")
    np.save(written_store / "indices.npy", indices[:-1])
    with pytest.raises(ValueError, match=r"indices.npy' holds int32 \(\d+,\), expected int32"):
        PatchStore(written_store)
    np.save(written_store / "indices.npy", indices)
    (written_store / "patches.npy").unlink()
    with pytest.raises(ValueError, match="patches.npy' is missing or unreadable"):
        PatchStore(written_store)


def test_bad_rows_and_batch_sizes_are_refused(written_store):
    store = PatchStore(written_store)
    with pytest.raises(ValueError, match=r"rows must be positions in \[0, 12\)"):
        store.batch([3, 12])
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        next(store.batches(0))
