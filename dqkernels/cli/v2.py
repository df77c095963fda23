"""``dqk v2``: DQ-V2 (docs/method.md §5) from the command line."""

from __future__ import annotations

from pathlib import Path

import click

from dqkernels.core.paths import refuse_overlap
from dqkernels.graphcut.api import METRICS
from dqkernels.pipeline.runner import DEVICE
from dqkernels.sampling import ALLOCATIONS
from dqkernels.v2 import tobias
from dqkernels.v2.run import MASK_MODELS, run_v2


@click.command("v2")
@click.option("--images", "images_path", required=True, type=click.Path(exists=True, path_type=Path),
              help="Image folder (one subfolder per class) or .npy/.npz image array (N,H,W[,C]; a .npz "
                   "may hold 'labels').")
@click.option("-o", "--out-dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="New (missing or empty) directory for masks, recipes, features, bins, subset and "
                   "the exported subset/.")
@click.option("--mix", type=click.FloatRange(min=0), default=0.5, show_default=True,
              help="Tobias images per original image (0.5: all originals + 50% as many Tobias images).")
@click.option("--bins", type=click.IntRange(min=1), default=10, show_default=True,
              help="Number of bins (per class when the images have labels).")
@click.option("--ratio", type=click.FloatRange(0, 1, min_open=True), default=0.1, show_default=True,
              help="Fraction of the pool (originals + Tobias images) to keep, in (0, 1].")
@click.option("--grid", type=click.IntRange(min=1), default=tobias.DEFAULT_GRID, show_default=True,
              help="Cells per side of the Tobias grid; the top half of the cells are foreground.")
@click.option("--cell-px", type=click.IntRange(min=1),
              help="Side of one cell in pixels during the swap. Default: round(224 / grid).")
@click.option("--bg-prob", type=click.FloatRange(0, 1), default=1.0, show_default=True,
              help="Probability that a Tobias image gets a partner's background (else it copies its base).")
@click.option("--mask-model", type=click.Choice(MASK_MODELS), default="random", show_default=True,
              help="random: seeded random ResNet-50 (Tobias). early: that ResNet-50 trained "
                   "--mask-epochs epochs on these images (needs labels).")
@click.option("--mask-checkpoint", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Local ResNet-50 weights for the masks, instead of --mask-model random.")
@click.option("--mask-epochs", type=click.IntRange(min=1), default=3, show_default=True,
              help="Epochs of the early-trained mask model.")
@click.option("--mask-px", type=click.IntRange(min=32), default=tobias.MASK_INPUT_PX, show_default=True,
              help="Input side in pixels of the mask model.")
@click.option("--masks", "masks_path", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="masks.npz of an earlier dqk v2 run on the same images: reuse its masks.")
@click.option("--model", default="resnet18", show_default=True,
              help="timm model for the binning features; it needs --checkpoint or --random-init.")
@click.option("--checkpoint", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Local weights for --model, loaded strictly.")
@click.option("--random-init", is_flag=True,
              help="Really bin features of a randomly initialised --model (seeded by --seed): of little value.")
@click.option("--img-size", type=click.IntRange(min=8),
              help="Feature model input side in pixels. Default: the model's.")
@click.option("--batch-size", type=click.IntRange(min=1), default=64, show_default=True,
              help="Images per forward pass (masks, mask training and features).")
@click.option("--device", type=DEVICE, help="cpu, cuda or cuda:N. Default: cuda when available.")
@click.option("--metric", type=click.Choice(METRICS), default="cosine", show_default=True,
              help="Binning distance.")
@click.option("--allocation", type=click.Choice(ALLOCATIONS), default="exact", show_default=True,
              help="Per-cell sample counts (see `dqk sample`).")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True,
              help="Seed of the Tobias draws, the random initialisations and the sampling.")
@click.option("-q", "--quiet", is_flag=True, help="No progress output.")
def v2_command(images_path, out_dir, mask_checkpoint, masks_path, mask_model, random_init, quiet, **options):
    """DQ-V2: enlarge the data with Tobias background-swap images, then bin and sample.

    Writes OUT_DIR/subset/ (the chosen originals and Tobias images, in the input's format) and
    the masks, recipes, features, bins and subset ids behind it.
    """
    if mask_checkpoint is not None and mask_model == "early":
        raise click.UsageError("--mask-checkpoint and --mask-model early exclude each other")
    refuse_overlap(
        {"--images": images_path, "--masks": masks_path, "--mask-checkpoint": mask_checkpoint,
         "--checkpoint": options["checkpoint"]},
        {"-o/--out-dir": out_dir},
        folders={"-o/--out-dir"},
    )
    if random_init == (options["checkpoint"] is not None):
        raise click.UsageError(
            "--checkpoint and --random-init exclude each other" if random_init else
            "the feature model has no weights: pass --checkpoint PATH, or --random-init to really use a "
            "random network"
        )
    outcome = run_v2(images_path, out_dir, mask_model=mask_model, mask_checkpoint=mask_checkpoint,
                     masks=masks_path, log=click.echo, progress=not quiet, **options)
    pool, kept = outcome.summary["pool"], outcome.summary["subset"]
    click.echo(
        f"wrote {outcome.out_dir}: pool {pool['originals']} originals + {pool['tobias']} Tobias images; "
        f"subset {kept['selected']} ({kept['originals']} originals, {kept['tobias']} Tobias) in "
        f"{outcome.out_dir / 'subset'}" + (" | features from a RANDOM-INIT network" if random_init else "")
    )
    if random_init:
        from dqkernels.features.image import RANDOM_INIT_WARNING

        click.echo(RANDOM_INIT_WARNING, err=True)
