"""Pixel quantization: GradCAM++ patch scoring and MAE reconstruction, the official code's
per-image loop against the batched versions, timed in the same run.

    pytest benchmarks/bench_pixel.py --benchmark-json=benchmarks/results/pixel_cpu.json
    pytest benchmarks/bench_pixel.py -m gpu --benchmark-json=benchmarks/results/pixel_gpu.json

Scoring: a random-init timm resnet18 explains its own prediction at 224 × 224 (a 7×7 map, 14×14
patch scores). ``per-image`` is what the official code does inside MAE's forward: per image one
forward and a full ``backward()`` (torchcam's GradCAMpp hooks); ``dqk-batched`` is
``gradcampp_patch_scores``: one forward and one ``autograd.grad`` over the layers after the
target layer, per batch. Reconstruction: a random-init MAE (the time does not depend on the
weights) rebuilds images that kept 147 of 196 patches; ``per-image`` calls ``reconstruct`` on one
image at a time, ``dqk-batched`` on the whole batch (float16 autocast on CUDA). Each case checks,
outside the timed region, that both versions agree. Throughput is in ``extra_info``
(``images_per_second``, from the fastest round).
"""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dqkernels.pixel.gradcam import (
    gradcampp_map,
    gradcampp_patch_scores,
    keep_mask_from_scores,
)
from dqkernels.pixel.mae import MaskedAutoencoder
from dqkernels.pixel.patch_store import PatchBatch, PatchGeometry, patchify

GPU = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
# case name: (device, images, MAE size, marks)
CASES = {
    "cpu-8x224": ("cpu", 8, "base", []),
    "gpu-256x224": ("cuda", 256, "large", GPU),
}
CASE_PARAMS = [pytest.param(name, marks=marks) for name, (_, _, _, marks) in CASES.items()]
ENGINES = ["per-image", "dqk-batched"]
IMAGENET_MEAN = torch.tensor([0.485, 0.456, 0.406])
IMAGENET_STD = torch.tensor([0.229, 0.224, 0.225])


def photos(count):
    """``count`` uint8 (count, 224, 224, 3) images cycling through scikit-image's sample photos."""
    import skimage.data
    from PIL import Image

    names = ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry")
    base = [np.asarray(Image.fromarray(getattr(skimage.data, name)()).resize((224, 224))) for name in names]
    return np.stack([base[i % len(base)] if i % 2 == 0 else base[i % len(base)][:, ::-1] for i in range(count)])


def normalised(images_uint8, device):
    pixels = torch.from_numpy(np.ascontiguousarray(images_uint8)).to(device).permute(0, 3, 1, 2).float() / 255
    return (pixels - IMAGENET_MEAN.to(device)[:, None, None]) / IMAGENET_STD.to(device)[:, None, None]


def official_per_image_scores(images, model):
    """(N, 196) scores the official way: per image a forward and a full backward, map resized to 14×14."""
    captured = {}
    handle = model.layer4.register_forward_hook(lambda module, inputs, output: captured.update(activations=output))
    maps = []
    try:
        for image in images:
            model.zero_grad(set_to_none=True)
            logits = model(image[None])
            activations = captured["activations"]
            activations.retain_grad()
            logits[0, logits[0].argmax()].backward()
            maps.append(gradcampp_map(activations.detach(), activations.grad))
    finally:
        handle.remove()
    cams = torch.cat(maps)[:, None]
    return F.interpolate(cams, size=(14, 14), mode="bilinear", align_corners=False, antialias=True).flatten(1).cpu()


def scoring_setup(case):
    import timm

    device, count, _, _ = CASES[case]
    torch.manual_seed(0)
    model = timm.create_model("resnet18", pretrained=False).to(device).eval()
    return model, normalised(photos(count), device)


@pytest.mark.parametrize("case", CASE_PARAMS)
@pytest.mark.parametrize("engine", ENGINES)
def test_gradcampp_scoring(benchmark, engine, case):
    model, images = scoring_setup(case)
    device, count, _, _ = CASES[case]

    def run():
        if engine == "per-image":
            return official_per_image_scores(images, model)
        return gradcampp_patch_scores(images, model, mode="compat", batch_size=count)

    if engine == "dqk-batched":  # the two agree (checked once, untimed)
        torch.testing.assert_close(run(), official_per_image_scores(images, model), rtol=1e-4, atol=1e-6)
    benchmark.extra_info.update(stage="gradcam++", engine=engine, case=case, images=count, device=device)
    benchmark.pedantic(run, rounds=3, iterations=1, warmup_rounds=1)
    benchmark.extra_info["images_per_second"] = count / benchmark.stats.stats.min


def reconstruction_setup(case):
    device, count, arch, _ = CASES[case]
    torch.manual_seed(0)
    mae = MaskedAutoencoder(arch, device=device)
    images = photos(count)
    scores = torch.rand(count, 196, generator=torch.Generator().manual_seed(0))
    keep_mask = keep_mask_from_scores(scores, drop=0.25).numpy()
    patches = patchify(images, 16).copy()
    patches[~keep_mask] = 0
    batch = PatchBatch(np.arange(count), np.arange(count), None, patches, keep_mask, PatchGeometry(224, 224, 16))
    return mae, batch


def single_image(batch, row):
    keep = slice(row, row + 1)
    return PatchBatch(batch.rows[keep], batch.sample_ids[keep], None, batch.patches[keep], batch.keep_mask[keep],
                      batch.geometry)


@pytest.mark.parametrize("case", CASE_PARAMS)
@pytest.mark.parametrize("engine", ENGINES)
def test_mae_reconstruction(benchmark, engine, case):
    mae, batch = reconstruction_setup(case)
    device, count, arch, _ = CASES[case]

    def run():
        if engine == "per-image":
            return torch.cat([mae.reconstruct(single_image(batch, row)) for row in range(count)])
        return mae.reconstruct(batch)

    if engine == "dqk-batched":  # the two agree up to rounding (float16 on CUDA: a few levels)
        difference = (run().int() - torch.cat([mae.reconstruct(single_image(batch, row))
                                               for row in range(count)]).int()).abs()
        assert difference.max() <= (1 if device == "cpu" else 8)
    benchmark.extra_info.update(stage="mae", engine=engine, case=case, images=count, device=device, arch=arch,
                                kept=int(batch.keep_mask[0].sum()))
    benchmark.pedantic(run, rounds=2 if device == "cpu" else 3, iterations=1, warmup_rounds=1)
    benchmark.extra_info["images_per_second"] = count / benchmark.stats.stats.min
