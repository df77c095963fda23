"""``dqk quantize`` and ``dqk reconstruct``: pixel quantization from the command line (docs/method.md §4).

    dqk quantize --images data/train --subset subset.npy --drop 0.25 -o patches/
    dqk reconstruct patches/ --mae mae_visualize_vit_large.pth -o images/

Thin wrappers over :func:`dqkernels.pixel.gradcam.quantize_images` and
:func:`dqkernels.pixel.mae.reconstruct_store`; registered on the ``dqk`` group, whose error handling
turns a bad input into one ``Error: ...`` line. Neither writes into, over or around its inputs.
"""

from __future__ import annotations

from pathlib import Path

import click

from dqkernels.core.paths import refuse_overlap
from dqkernels.formats.subset import manifest_path
from dqkernels.pipeline.runner import DEVICE
from dqkernels.pixel.gradcam import CAM_MODES, CAM_TARGETS, DEFAULT_DROP

MAE_ARCH_NAMES = ("base", "large", "huge")
_EXISTING_FILE = click.Path(exists=True, dir_okay=False, path_type=Path)


def _progress(desc: str, quiet: bool):
    """Progress of ``desc`` in images on stderr unless -q: a bar on a terminal, else a line every
    few seconds."""
    from dqkernels.pipeline.progress import Progress

    return Progress(desc, unit="images", enabled=not quiet)


@click.command("quantize")
@click.option("--images", "images_path", required=True, type=click.Path(exists=True, path_type=Path),
              help="The data set: an image folder (one subfolder per class) or a .npy/.npz image array.")
@click.option("--subset", "subset_path", type=_EXISTING_FILE,
              help="Subset .npy of sample ids from `dqk sample`; ids map to images through the items "
                   "(path and size) of the feature set named in its manifest. Default: every image.")
@click.option("--features", "features_path", type=click.Path(exists=True, path_type=Path),
              help="The feature set (directory or features.json) the --subset ids are rows of. Default: the "
                   "one the subset's manifest names, or the features.json beside the subset if that moved.")
@click.option("--drop", type=click.FloatRange(0, 1, max_open=True), default=DEFAULT_DROP, show_default=True,
              help="Fraction of each image's patches to drop, in [0, 1); floor(patches x (1 - drop)) are kept.")
@click.option("-o", "--out", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="New patch-store directory (must be missing or empty).")
@click.option("--img-size", type=click.IntRange(min=1), default=224, show_default=True,
              help="Images are resized to this square size in pixels before scoring and storing.")
@click.option("--grid", type=click.IntRange(min=1), default=14, show_default=True,
              help="Patches per side; must match the MAE used by `dqk reconstruct` (14 for base and "
                   "large, 16 for huge) and divide --img-size and 224.")
@click.option("--cam-model", default="resnet18", show_default=True,
              help="timm CNN whose GradCAM++ map scores the patches (it sees 224 x 224 images).")
@click.option("--cam-checkpoint", type=_EXISTING_FILE,
              help="Local weights for --cam-model, loaded strictly. Default: random init from --seed "
                   "(with a warning: a random network scores the patches).")
@click.option("--cam-layer", help="Module of --cam-model to explain. Default: its last feature stage.")
@click.option("--target", type=click.Choice(CAM_TARGETS), default="pred", show_default=True,
              help="Class explained: pred (the CAM model's own prediction, as the official code) or label.")
@click.option("--mode", type=click.Choice(CAM_MODES), default="paper", show_default=True,
              help="paper: map upsampled to the image and averaged per patch. compat: map resized "
                   "straight to the patch grid, as the official code.")
@click.option("--batch-size", type=click.IntRange(min=1), default=64, show_default=True,
              help="Images per GradCAM++ forward/backward pass.")
@click.option("--device", type=DEVICE, help="cpu, cuda or cuda:N. Default: cuda when available.")
@click.option("--workers", type=click.IntRange(min=0), default=0, show_default=True,
              help="Image-decoding processes for image folders (0 = decode in this process).")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True,
              help="Seed of the CAM model's random initialisation when there is no --cam-checkpoint.")
@click.option("-q", "--quiet", is_flag=True, help="No progress output.")
def quantize_command(images_path, subset_path, features_path, drop, out_dir, img_size, grid, cam_model,
                     cam_checkpoint, cam_layer, target, mode, batch_size, device, workers, seed, quiet):
    """Keep the informative patches of each image (GradCAM++) in a patch store."""
    from dqkernels.pixel.gradcam import quantize_images

    refuse_overlap(
        {"--images": images_path, "--subset": subset_path,
         "the subset's manifest": manifest_path(subset_path) if subset_path is not None else None,
         "--features": features_path, "--cam-checkpoint": cam_checkpoint},
        {"-o/--out": out_dir},
        folders={"-o/--out"},
        shallow={"--features"},
    )
    with _progress("quantize", quiet) as stored:
        outcome = quantize_images(
            images_path, out_dir, subset=subset_path, features=features_path, drop=drop, img_size=img_size,
            grid=grid, cam_model=cam_model, cam_checkpoint=cam_checkpoint, cam_layer=cam_layer, target=target,
            mode=mode, batch_size=batch_size, device=device, workers=workers, seed=seed,
            progress=stored,
        )
    click.echo(
        f"wrote {outcome.path}: {outcome.count} images, {outcome.kept} of {outcome.num_patches} patches "
        f"kept each (drop {drop}) | bytes {outcome.image_bytes} -> {outcome.store_bytes} "
        f"({outcome.store_bytes / max(outcome.image_bytes, 1):.1%})"
        + (" | CAM model RANDOM-INIT" if cam_checkpoint is None else "")
    )
    if cam_checkpoint is None:
        from dqkernels.pipeline.runner import CAM_RANDOM_INIT_WARNING

        click.echo(CAM_RANDOM_INIT_WARNING, err=True)


@click.command("reconstruct")
@click.argument("store_path", metavar="PATCHES", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--mae", "mae_checkpoint", required=True, type=_EXISTING_FILE,
              help="Official MAE checkpoint with its decoder (e.g. mae_visualize_vit_large.pth), "
                   "loaded strictly.")
@click.option("--arch", type=click.Choice(MAE_ARCH_NAMES), default="large", show_default=True,
              help="MAE size of the checkpoint: base (ViT-B/16), large (ViT-L/16) or huge (ViT-H/14).")
@click.option("-o", "--out", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="New ImageFolder directory for the PNG images and samples.jsonl (must be missing or empty).")
@click.option("--batch-size", type=click.IntRange(min=1), default=64, show_default=True,
              help="Images per MAE pass.")
@click.option("--device", type=DEVICE, help="cpu, cuda or cuda:N. Default: cuda when available (float16 autocast).")
@click.option("-q", "--quiet", is_flag=True, help="No progress output.")
def reconstruct_command(store_path, mae_checkpoint, arch, out_dir, batch_size, device, quiet):
    """Rebuild the full images of PATCHES (from `dqk quantize`) with an MAE, as an ImageFolder tree."""
    from dqkernels.pixel.mae import reconstruct_store

    refuse_overlap({"PATCHES": store_path, "--mae": mae_checkpoint}, {"-o/--out": out_dir}, folders={"-o/--out"})
    with _progress("reconstruct", quiet) as written:
        outcome = reconstruct_store(store_path, mae_checkpoint, out_dir, arch=arch, batch_size=batch_size,
                                    device=device, progress=written)
    click.echo(f"wrote {outcome.path}: {outcome.count} images of {outcome.height}x{outcome.width} "
               f"(ImageFolder + samples.jsonl) | MAE {arch} | {outcome.seconds:.1f} s")
