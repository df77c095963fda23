"""GradCAM++ patch scoring (docs/method.md §4): batched scores against a per-image reference written from the
formula, one forward and one autograd.grad per batch, stable tie-breaking and the drop rule."""

import functools
import math

import numpy as np
import pytest
import timm
import torch

from dqkernels.pixel.gradcam import (
    gradcampp_patch_scores,
    keep_count,
    keep_mask_from_scores,
)

IMAGENET_MEAN = torch.tensor([0.485, 0.456, 0.406])[:, None, None]
IMAGENET_STD = torch.tensor([0.229, 0.224, 0.225])[:, None, None]


@functools.lru_cache(maxsize=None)
def photo_batch(height=224, width=224):
    """Five scikit-image sample photos, resized, as a normalised (5, 3, height, width) float32 batch."""
    import skimage.data

    photos = []
    for name in ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry"):
        pixels = torch.from_numpy(getattr(skimage.data, name)()).permute(2, 0, 1).float() / 255
        photos.append(torch.nn.functional.interpolate(
            pixels[None], size=(height, width), mode="bilinear", antialias=True)[0])
    return (torch.stack(photos) - IMAGENET_MEAN) / IMAGENET_STD


@pytest.fixture(scope="module")
def resnet18():
    torch.manual_seed(0)
    return timm.create_model("resnet18", pretrained=False).eval()


def bilinear_matrix(size_in, size_out):
    """(size_out, size_in) float64 matrix of 1-D bilinear resampling with half-pixel centres."""
    matrix = np.zeros((size_out, size_in))
    for out in range(size_out):
        source = max((out + 0.5) * size_in / size_out - 0.5, 0.0)
        low = min(math.floor(source), size_in - 1)
        high = min(low + 1, size_in - 1)
        weight = source - low
        matrix[out, low] += 1 - weight
        matrix[out, high] += weight
    return matrix


def reference_cam(image, model, layer_name, class_index=None):
    """GradCAM++ map (h, w) float64 of one image, written straight from docs/method.md §4, one channel at a time."""
    captured = {}
    layer = dict(model.named_modules())[layer_name]
    handle = layer.register_forward_hook(lambda module, inputs, output: captured.update(A=output))
    logits = model(image[None])
    handle.remove()
    if class_index is None:
        class_index = int(logits[0].argmax())
    (gradient,) = torch.autograd.grad(logits[0, class_index], captured["A"])
    activations = captured["A"][0].detach().double().numpy()
    gradient = gradient[0].double().numpy()
    cam = np.zeros(activations.shape[1:])
    for k in range(activations.shape[0]):
        g, a = gradient[k], activations[k]
        alpha = np.where(g != 0, g**2 / (2 * g**2 + a.sum() * g**3 + 1e-6), 0.0)
        cam += np.sum(alpha * np.maximum(g, 0)) * a
    return np.maximum(cam, 0)


def reference_patch_scores(cam, image_size, patch, mode):
    """Scores (L,) of a map: upsampled to the image and averaged per patch, or resized to the grid."""
    height, width = image_size
    grid_h, grid_w = height // patch, width // patch
    if mode == "compat":
        resized = bilinear_matrix(cam.shape[0], grid_h) @ cam @ bilinear_matrix(cam.shape[1], grid_w).T
        return resized.reshape(-1)
    upsampled = bilinear_matrix(cam.shape[0], height) @ cam @ bilinear_matrix(cam.shape[1], width).T
    scores = [upsampled[r * patch:(r + 1) * patch, c * patch:(c + 1) * patch].mean()
              for r in range(grid_h) for c in range(grid_w)]
    return np.array(scores)


@pytest.mark.parametrize("layer_name", ["layer4", "layer3"])
def test_batched_scores_match_the_per_image_reference(resnet18, layer_name):
    images = photo_batch()
    cams = [reference_cam(image, resnet18, layer_name) for image in images]
    target_layer = None if layer_name == "layer4" else layer_name  # layer4 is the default
    for mode in ("paper", "compat"):
        scores = gradcampp_patch_scores(images, resnet18, patch=16, mode=mode, target_layer=target_layer,
                                        batch_size=3)
        reference = np.stack([reference_patch_scores(cam, (224, 224), 16, mode) for cam in cams])
        assert scores.shape == (5, 196) and scores.dtype == torch.float32
        assert reference.max() > 0 and np.ptp(reference, axis=1).min() > 0  # the maps are not flat
        np.testing.assert_allclose(scores.numpy(), reference, rtol=1e-5, atol=1e-5 * reference.max())


def test_label_targets_and_non_square_images_match_the_reference(resnet18):
    images = photo_batch(160, 224)
    labels = np.array([3, 917, 0, 500, 42])
    scores = gradcampp_patch_scores(images, resnet18, target=labels, patch=32, mode="paper")
    reference = np.stack([reference_patch_scores(reference_cam(image, resnet18, "layer4", int(label)), (160, 224),
                                                 32, "paper") for image, label in zip(images, labels)])
    assert scores.shape == (5, 5 * 7)
    np.testing.assert_allclose(scores.numpy(), reference, rtol=1e-5, atol=1e-5 * reference.max())
    predicted = gradcampp_patch_scores(images, resnet18, patch=32)
    assert not torch.allclose(predicted, scores)  # the target class matters


def test_one_forward_and_one_autograd_grad_per_batch(resnet18, monkeypatch):
    calls = {"forward": 0, "grad": 0, "backward": 0}
    real_grad, real_backward = torch.autograd.grad, torch.autograd.backward

    def counting_grad(*args, **kwargs):
        calls["grad"] += 1
        return real_grad(*args, **kwargs)

    def counting_backward(*args, **kwargs):
        calls["backward"] += 1
        return real_backward(*args, **kwargs)

    monkeypatch.setattr(torch.autograd, "grad", counting_grad)
    monkeypatch.setattr(torch.autograd, "backward", counting_backward)
    def count_forward(module, inputs):
        calls["forward"] += 1

    handle = resnet18.register_forward_pre_hook(count_forward)
    resnet18.train()
    try:
        gradcampp_patch_scores(photo_batch()[:3], resnet18, batch_size=2)
    finally:
        handle.remove()
    assert calls == {"forward": 2, "grad": 2, "backward": 0}  # 3 images in batches of 2
    assert resnet18.training and all(p.requires_grad and p.grad is None for p in resnet18.parameters())
    resnet18.eval()


def test_an_all_zero_map_keeps_the_first_patches():
    torch.manual_seed(1)
    model = timm.create_model("resnet18", pretrained=False, num_classes=4).eval()
    torch.nn.init.zeros_(model.fc.weight)  # target logit independent of the activations: g = 0
    scores = gradcampp_patch_scores(photo_batch()[:2], model)
    assert torch.equal(scores, torch.zeros(2, 196))
    keep_mask = keep_mask_from_scores(scores, drop=0.25)
    assert keep_mask.sum(dim=1).tolist() == [147, 147]
    assert torch.equal(keep_mask, (torch.arange(196) < 147).expand(2, -1))


def test_ties_are_broken_by_patch_index():
    scores = torch.tensor([[1.0, 3.0, 3.0, 1.0, 0.0], [0.0, 0.0, 2.0, 0.0, 0.0]])
    assert keep_mask_from_scores(scores, drop=0.4).int().tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 0, 0]]
    assert keep_mask_from_scores(scores, drop=0.6).int().tolist() == [[0, 1, 1, 0, 0], [1, 0, 1, 0, 0]]


@pytest.mark.parametrize("num_patches, drop, kept", [
    (196, 0.2, 156), (196, 0.25, 147), (196, 0.0, 196), (10, 0.9, 1), (100, 0.3, 70), (49, 0.5, 24),
])
def test_keep_count_is_the_floor_of_the_kept_fraction(num_patches, drop, kept):
    assert keep_count(num_patches, drop) == kept


@pytest.mark.parametrize("drop", [1.0, -0.1, float("nan"), 1.5, True, "0.2"])
def test_drop_outside_zero_one_is_refused(drop):
    with pytest.raises(ValueError, match="drop"):
        keep_count(196, drop)


def test_a_drop_that_keeps_nothing_is_refused():
    with pytest.raises(ValueError, match="keeps no patch"):
        keep_count(4, 0.8)


def test_bad_scoring_inputs_name_the_argument(resnet18):
    images = photo_batch()[:2]
    with pytest.raises(TypeError, match="images must be a torch.Tensor"):
        gradcampp_patch_scores(images.numpy(), resnet18)
    with pytest.raises(ValueError, match="images must be a floating"):
        gradcampp_patch_scores(images[0], resnet18)
    with pytest.raises(ValueError, match="patch must be a positive integer dividing the image size 224x224"):
        gradcampp_patch_scores(images, resnet18, patch=15)
    with pytest.raises(ValueError, match="mode must be one of"):
        gradcampp_patch_scores(images, resnet18, mode="exact")
    with pytest.raises(ValueError, match="target labels must be 2 integers"):
        gradcampp_patch_scores(images, resnet18, target=[1, 2, 3])
    with pytest.raises(ValueError, match="target must be 'pred'"):
        gradcampp_patch_scores(images, resnet18, target="label")
    with pytest.raises(ValueError, match="target label 1000 does not fit 1000 classes"):
        gradcampp_patch_scores(images, resnet18, target=[0, 1000])
    with pytest.raises(ValueError, match="target_layer 'layer5' is not a module of the model; did you mean"):
        gradcampp_patch_scores(images, resnet18, target_layer="layer5")
    with pytest.raises(ValueError, match="batch_size"):
        gradcampp_patch_scores(images, resnet18, batch_size=0)
    with pytest.raises(TypeError, match="float32"):
        gradcampp_patch_scores(images, timm.create_model("resnet18", pretrained=False).half())
