"""Feature extraction: image listing and arrays, timm models and checkpoints, gradient embeddings
(docs/method.md §1) against explicit autograd gradients, and instruction-data text features (docs/method.md §6)."""

import json

import numpy as np
import pytest
import torch
from conftest_data import (
    digits_arrays,
    digits_folder_fixture,  # noqa: F401
    instruction_records,
    text_model_path,
    write_instruction_jsonl,
)

from dqkernels.features.image import (
    build_model,
    check_model_name,
    extract_image_features,
    list_image_folder,
    load_image_array,
)
from dqkernels.features.text import (
    embed_texts,
    read_instruction_records,
    record_text,
    write_instruction_records,
)


def _png(path, value=128, size=16):
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size, size, 3), value, dtype=np.uint8)).save(path)


def test_image_folder_listing_is_sorted_with_class_labels(tmp_path):
    for relative in ("b/z.png", "b/a.png", "a/y.jpg", "a/sub/x.png"):
        _png(tmp_path / relative)
    (tmp_path / "a" / "notes.txt").write_text("not an image")
    _png(tmp_path / "stray.png")  # not inside a class folder
    (tmp_path / "c").mkdir()  # a class folder without images

    listing = list_image_folder(tmp_path)

    # torchvision's ImageFolder order: a folder's own files before its subfolders' files.
    assert listing.relative_paths == ["a/y.jpg", "a/sub/x.png", "b/a.png", "b/z.png"]
    assert listing.labels.tolist() == [0, 0, 1, 1]
    assert listing.class_names == ["a", "b"]


def test_image_folder_without_images_is_an_error(tmp_path):
    (tmp_path / "cats").mkdir()
    (tmp_path / "cats" / "readme.txt").write_text("no images here")
    with pytest.raises(ValueError, match="holds no images"):
        list_image_folder(tmp_path)


def test_image_arrays_from_npy_and_npz(tmp_path):
    images, labels = digits_arrays(6, size=16, rgb=False)
    np.save(tmp_path / "gray.npy", images)
    np.savez(tmp_path / "pair.npz", images=images, labels=labels)
    np.save(tmp_path / "channels_first.npy", np.zeros((2, 3, 8, 8), np.uint8))
    np.savez(tmp_path / "short.npz", images=images, labels=labels[:4])

    loaded, no_labels = load_image_array(tmp_path / "gray.npy")
    assert isinstance(loaded, np.memmap) and no_labels is None
    loaded, loaded_labels = load_image_array(tmp_path / "pair.npz")
    assert np.array_equal(loaded, images) and np.array_equal(loaded_labels, labels)
    with pytest.raises(ValueError, match="expected \\(N, H, W\\) or \\(N, H, W, C\\)"):
        load_image_array(tmp_path / "channels_first.npy")
    with pytest.raises(ValueError, match="labels .* have shape \\(4,\\), expected \\(6,\\)"):
        load_image_array(tmp_path / "short.npz")


def test_unknown_model_name_suggests_close_names():
    check_model_name("resnet18.a1_in1k")  # a pretrained tag on a known architecture is fine
    with pytest.raises(ValueError, match="unknown timm model 'resnet19'.*did you mean"):
        check_model_name("resnet19")


def test_random_init_is_seeded_and_uint8_equals_float_input():
    images, _ = digits_arrays(8)
    as_float = images.astype(np.float32) / 255.0
    as_gray = images[..., 0]

    def pooled(seed, pixels):
        model = build_model("resnet18", num_classes=10, seed=seed)
        return extract_image_features(model, images=pixels, img_size=32, device="cpu").pooled

    reference = pooled(0, images)
    assert reference.shape == (8, 512) and reference.dtype == np.float32
    np.testing.assert_array_equal(pooled(0, images), reference)
    np.testing.assert_allclose(pooled(0, as_float), reference, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(pooled(0, as_gray), reference, rtol=1e-5, atol=1e-6)
    assert not np.allclose(pooled(1, images), reference)


def test_checkpoint_is_loaded_strictly(tmp_path):
    trained = build_model("resnet18", num_classes=7, seed=5)
    torch.save({"state_dict": trained.state_dict()}, tmp_path / "wrapped.pth")
    state = trained.state_dict()
    torch.save({**state, "extra.weight": torch.zeros(1)}, tmp_path / "extra.pth")
    (tmp_path / "garbage.pth").write_bytes(b"this is not a checkpoint")

    loaded = build_model("resnet18", checkpoint=tmp_path / "wrapped.pth", seed=99)
    assert loaded.num_classes == 7  # taken from the checkpoint's classifier
    for key, value in loaded.state_dict().items():
        assert torch.equal(value, state[key]), key

    with pytest.raises(ValueError, match="does not fit resnet34: .*missing keys"):
        build_model("resnet34", checkpoint=tmp_path / "wrapped.pth")
    with pytest.raises(ValueError, match="1 unexpected keys \\(extra.weight\\)"):
        build_model("resnet18", checkpoint=tmp_path / "extra.pth")
    with pytest.raises(ValueError, match="shape mismatch for fc.weight: checkpoint \\(7, 512\\) vs model \\(5, 512\\)"):
        build_model("resnet18", checkpoint=tmp_path / "wrapped.pth", num_classes=5)
    with pytest.raises(ValueError, match="cannot read checkpoint"):
        build_model("resnet18", checkpoint=tmp_path / "garbage.pth")


@pytest.mark.parametrize("grad_delta", ["standard", "official"])
def test_gradient_embedding_reproduces_explicit_last_layer_gradients(grad_delta):
    """δ and e stored per sample give exactly the per-sample gradients of the final linear layer:
    ∂L/∂b = δ, ∂L/∂W = δ eᵀ, hence g_i·g_j = (δ_i·δ_j)(1 + e_i·e_j) and ‖g_i‖² = ‖δ_i‖²(1 + ‖e_i‖²)."""
    images, labels = digits_arrays(10)
    model = build_model("resnet18", num_classes=10, seed=3)
    stored = extract_image_features(
        model, images=images, labels=labels, mode="gradient", grad_delta=grad_delta,
        img_size=32, batch_size=4, device="cpu",
    )
    delta = stored.delta.astype(np.float64)
    embed = stored.embed.astype(np.float64)
    assert delta.shape == (10, 10) and embed.shape == (10, 512)

    mean = torch.tensor(model.pretrained_cfg["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(model.pretrained_cfg["std"]).view(1, 3, 1, 1)
    pixels = (torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0 - mean) / std
    classifier = model.get_classifier()
    gradients = []
    for i in range(len(images)):
        logits = model(pixels[i : i + 1])
        target = torch.tensor([labels[i]])
        if grad_delta == "standard":
            loss = torch.nn.functional.cross_entropy(logits, target)
        else:  # the official code applies cross-entropy to softmax outputs
            loss = torch.nn.functional.cross_entropy(torch.softmax(logits, dim=1), target)
        weight_grad, bias_grad = torch.autograd.grad(loss, [classifier.weight, classifier.bias])
        outer = np.outer(delta[i], embed[i])
        np.testing.assert_allclose(bias_grad.numpy(), delta[i], rtol=1e-5, atol=1e-6 * np.abs(delta[i]).max())
        np.testing.assert_allclose(weight_grad.numpy(), outer, rtol=1e-5, atol=1e-6 * np.abs(outer).max())
        gradients.append(torch.cat([bias_grad, weight_grad.flatten()]).double().numpy())
    explicit = np.stack(gradients)  # (10, C + C·D)

    explicit_gram = explicit @ explicit.T
    factored_gram = (delta @ delta.T) * (1.0 + embed @ embed.T)
    scale = np.abs(explicit_gram).max()
    np.testing.assert_allclose(factored_gram, explicit_gram, rtol=1e-5, atol=1e-6 * scale)
    factored_sq_norms = (delta**2).sum(1) * (1.0 + (embed**2).sum(1))
    np.testing.assert_allclose(factored_sq_norms, (explicit**2).sum(1), rtol=1e-5)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_cuda_device_without_cuda_is_a_clear_error():
    model = build_model("resnet18", num_classes=2, seed=0)
    with pytest.raises(ValueError, match="CUDA is not available here"):
        extract_image_features(model, images=digits_arrays(2)[0], img_size=32, device="cuda")


def test_gradient_mode_needs_labels_that_fit_the_classifier():
    images, labels = digits_arrays(4)
    model = build_model("resnet18", num_classes=5, seed=0)
    with pytest.raises(ValueError, match="gradient mode needs labels"):
        extract_image_features(model, images=images, mode="gradient", img_size=32, device="cpu")
    with pytest.raises(ValueError, match="label 9 does not fit a classifier with 5 classes"):
        extract_image_features(
            model, images=images, labels=np.array([0, 1, 2, 9]), mode="gradient", img_size=32, device="cpu"
        )


def test_unreadable_images_are_skipped_and_counted_or_fatal_when_strict(tmp_path, digits_folder):
    images = list_image_folder(digits_folder)
    paths = [str(digits_folder / p) for p in images.relative_paths[:5]]
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    paths.insert(2, str(broken))
    model = build_model("resnet18", num_classes=10, seed=0)

    result = extract_image_features(model, image_paths=paths, img_size=32, device="cpu", batch_size=4)
    assert result.kept_rows.tolist() == [0, 1, 3, 4, 5]
    assert [row for row, _ in result.skipped] == [2] and result.pooled.shape == (5, 512)

    workers = extract_image_features(
        model, image_paths=paths, img_size=32, device="cpu", batch_size=4, num_workers=2
    )
    np.testing.assert_array_equal(workers.pooled, result.pooled)  # same rows, same order

    with pytest.raises(ValueError, match="cannot read image .*broken.png"):
        extract_image_features(model, image_paths=paths, img_size=32, device="cpu", strict=True)
    with pytest.raises(ValueError, match="none of the 1 images could be read"):
        extract_image_features(model, image_paths=[str(broken)], img_size=32, device="cpu")


# --------------------------------------------------------------------------- text


def test_instruction_records_round_trip_in_their_own_format(tmp_path):
    jsonl = write_instruction_jsonl(tmp_path / "data.jsonl", count=6)
    array_file = tmp_path / "data.json"
    array_file.write_text(json.dumps(instruction_records(6), indent=4), encoding="utf-8")
    chosen = np.array([1, 4])

    from_jsonl = read_instruction_records(jsonl)
    assert from_jsonl.file_format == "jsonl" and len(from_jsonl.records) == 6
    write_instruction_records(from_jsonl, chosen, tmp_path / "subset.jsonl")
    original_lines = jsonl.read_text().splitlines()
    assert (tmp_path / "subset.jsonl").read_text().splitlines() == [original_lines[1], original_lines[4]]

    from_json = read_instruction_records(array_file)
    write_instruction_records(from_json, chosen, tmp_path / "subset.json")
    assert json.loads((tmp_path / "subset.json").read_text()) == [instruction_records(6)[i] for i in (1, 4)]


def test_record_text_joins_non_empty_fields():
    assert record_text({"instruction": "Add.", "input": "", "output": "3"}) == "Add.\n3"
    assert record_text({"instruction": "Add.", "input": "1 + 2", "output": "3"}) == "Add.\n1 + 2\n3"


@pytest.mark.parametrize(
    "content, suffix, message",
    [
        ('{"instruction": "a"}\n{oops\n', ".jsonl", "record 2: invalid JSON"),
        ('{"instruction": "a"}', ".json", "must hold a JSON array"),
        ('[{"question": "a"}]', ".json", "record 1: expected an object with instruction/input/output"),
        ("\n\n", ".jsonl", "holds no records"),
    ],
)
def test_malformed_instruction_data_is_an_error(tmp_path, content, suffix, message):
    path = tmp_path / f"data{suffix}"
    path.write_text(content)
    with pytest.raises(ValueError, match=message):
        read_instruction_records(path)


def test_text_embeddings_keep_input_order(tmp_path):
    model_path = text_model_path()
    with pytest.raises(ValueError, match="is not a sentence-embedding model directory"):
        embed_texts(["a"], tmp_path, device="cpu")
    texts = ["A cat sleeps on the mat.", "Stock markets fell sharply today.", "A cat sleeps on the mat."]
    embeddings = embed_texts(texts, model_path, batch_size=2, device="cpu")
    assert embeddings.shape == (3, 384) and embeddings.dtype == np.float32
    np.testing.assert_allclose(embeddings[0], embeddings[2], atol=1e-5)
    assert np.abs(embeddings[0] - embeddings[1]).max() > 1e-2
