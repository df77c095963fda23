"""``dqk``: Dataset Quantization from the command line.

    dqk features DATA -o feats/            # timm / sentence-embedding features
    dqk bin --features feats/ --bins 10    # GraphCut bins  → feats/bins.npz
    dqk sample --bins feats/bins.npz --ratio 0.1 --export subset/
    dqk run config.yaml                    # all of the above, resumable
    dqk info feats/bins.npz

Every command is a thin wrapper over a function of :mod:`dqkernels.pipeline.stages`. A bad input ends
the command with one ``Error: ...`` line on stderr and exit code 1 (2 for a malformed command
line); no output file is left half-written.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Optional

import click

from dqkernels import pipeline
from dqkernels.features.image import FEATURE_MODES, GRAD_DELTAS
from dqkernels.formats.bins import bin_sizes_summary
from dqkernels.graphcut.api import BACKENDS, METRICS
from dqkernels.sampling.sample import ALLOCATIONS


def _one_line(message: str) -> str:
    return " ".join(message.split())


class _DeviceType(click.ParamType):
    """A torch device name: cpu, cuda or cuda:N."""

    name = "device"

    def convert(self, value, param, ctx):
        if value is None or re.fullmatch(r"cpu|cuda(:\d+)?", str(value)):
            return value
        self.fail(f"{value!r} is not a device (cpu, cuda or cuda:N)", param, ctx)


DEVICE = _DeviceType()


class _DqkGroup(click.Group):
    """A click group whose errors are one line on stderr, library errors included."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except (ValueError, TypeError, OSError) as error:
            raise click.ClickException(_one_line(str(error) or type(error).__name__)) from error

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        try:
            exit_code = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click.ClickException as error:
            message = error.format_message()
            if isinstance(error, click.UsageError) and error.ctx is not None:
                message += f" (see '{error.ctx.command_path} --help')"
            click.echo(f"Error: {_one_line(message)}", err=True)
            sys.exit(error.exit_code)
        except click.Abort:
            click.echo("Aborted!", err=True)
            sys.exit(1)
        sys.exit(exit_code if isinstance(exit_code, int) else 0)


def _show_progress(quiet: bool) -> bool:
    return not quiet and sys.stderr.isatty()


@click.group(cls=_DqkGroup, context_settings={"help_option_names": ["-h", "--help"]})
def cli() -> None:
    """Dataset Quantization: pick a small, diverse training subset.

    features → bin → sample, or all three with `dqk run`.
    """


# --------------------------------------------------------------------------- features

_EXISTING_FILE = click.Path(exists=True, dir_okay=False, path_type=Path)


@cli.command("features")
@click.argument("input_path", metavar="INPUT", type=click.Path(exists=True, path_type=Path))
@click.option("-o", "--out-dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Directory to write feats.npy (or delta.npy + embed.npy), labels.npy and "
                   "features.json into; created if missing.")
@click.option("--model", default="resnet18", show_default=True,
              help="timm model name for images. Weights are never downloaded.")
@click.option("--checkpoint", type=_EXISTING_FILE,
              help="Local weights (.pth/.pt/.safetensors) loaded strictly into --model. "
                   "Default: none, the model stays randomly initialised from --seed.")
@click.option("--mode", type=click.Choice(FEATURE_MODES), default="pooled", show_default=True,
              help="pooled: penultimate pooled features. gradient: the last layer's gradient "
                   "embedding, stored as delta (classes) and embed (feature dims); needs labels.")
@click.option("--grad-delta", type=click.Choice(GRAD_DELTAS), default="standard",
              show_default=True,
              help="Gradient mode only. standard: softmax(z) - onehot(y). official: the official DQ "
                   "code's double-softmax delta.")
@click.option("--text-model", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Local sentence-embedding model directory; required for .json/.jsonl instruction data.")
@click.option("--num-classes", type=click.IntRange(min=1),
              help="Classifier size. Default: the checkpoint's, else the number of classes in the data.")
@click.option("--img-size", type=click.IntRange(min=8),
              help="Images are resized to this square size in pixels. Default: the model's input size.")
@click.option("--batch-size", type=click.IntRange(min=1), default=64, show_default=True,
              help="Images (or texts) per forward pass.")
@click.option("--device", type=DEVICE, help="cpu, cuda or cuda:N. Default: cuda when available.")
@click.option("--workers", type=click.IntRange(min=0), default=0, show_default=True,
              help="Image-decoding processes for image folders (0 = decode in this process).")
@click.option("--strict", is_flag=True,
              help="Stop at the first unreadable image instead of skipping it.")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Seed of the random initialisation when there is no --checkpoint.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
def features_command(input_path, out_dir, model, checkpoint, mode, grad_delta, text_model, num_classes,
                     img_size, batch_size, device, workers, strict, seed, quiet):
    """Extract features of INPUT for binning.

    INPUT is an image folder (one subfolder per class), a .npy/.npz image array (N,H,W[,C],
    uint8 or float in [0,1]; a .npz may hold 'labels'), or instruction data (.json/.jsonl records
    with instruction/input/output, needs --text-model).
    """
    if grad_delta != "standard" and mode != "gradient":
        raise click.UsageError("--grad-delta applies to --mode gradient only")
    sidecar = pipeline.extract_features(
        input_path, out_dir, model=model, checkpoint=checkpoint, mode=mode, grad_delta=grad_delta,
        text_model=text_model, num_classes=num_classes, img_size=img_size, batch_size=batch_size,
        device=device, workers=workers, strict=strict, seed=seed, progress=_show_progress(quiet),
    )
    arrays = ", ".join(f"{sidecar['files'][name]} ({sidecar['count']}x{dim} {sidecar['dtype']})"
                       for name, dim in sidecar["dims"].items())
    weights = sidecar.get("checkpoint")
    if weights == "random-init":
        weights = f"random-init, seed {sidecar['seed']}"
    line = f"wrote {out_dir}: {arrays}"
    if "labels" in sidecar["files"]:
        line += f", {sidecar['files']['labels']}"
    line += f"; model {sidecar['model']}" + (f" ({weights})" if weights else "")
    if sidecar["skipped"]["count"]:
        line += f"; skipped {sidecar['skipped']['count']} unreadable images"
    click.echo(line)


# --------------------------------------------------------------------------- bin


@cli.command("bin")
@click.option("--features", "features_path", required=True, type=click.Path(exists=True, path_type=Path),
              help="Features: a (samples x dims) float .npy, or a directory / features.json written "
                   "by `dqk features` (gradient mode included).")
@click.option("--bins", type=click.IntRange(min=1), default=10, show_default=True,
              help="Number of bins N (at most the number of samples).")
@click.option("--labels", "labels_path", type=_EXISTING_FILE,
              help="Integer labels .npy (one per sample): bin each class on its own. Default: the "
                   "feature set's labels.npy when there is one.")
@click.option("--no-labels", is_flag=True, help="Ignore the feature set's labels and bin all samples together.")
@click.option("--metric", type=click.Choice(METRICS), default="cosine", show_default=True,
              help="cosine: L2-normalise rows first; euclidean: raw squared distances.")
@click.option("--lam", type=click.FloatRange(min=0, min_open=True), default=1.0, show_default=True,
              help="GraphCut lambda (> 0).")
@click.option("--device", type=DEVICE, help="cpu, cuda or cuda:N. Default: chosen by the library.")
@click.option("--backend", type=click.Choice(BACKENDS), default="auto", show_default=True,
              help="Kernel backend; auto picks the fastest one available, reference is the slow "
                   "float64 oracle.")
@click.option("--sizes", type=click.Choice(["split", "official"]), default="split", show_default=True,
              help="split: sizes differ by at most one. official: the official code's sizes.")
@click.option("-o", "--out", type=click.Path(dir_okay=False, path_type=Path),
              help="Output .npz. Default: bins.npz beside the features.")
@click.option("--distributed", is_flag=True,
              help="Run as one process of a torchrun job (torchrun --nproc-per-node N -m dqkernels.cli "
                   "bin ... --distributed): classes are dealt to the processes, or without labels "
                   "the rows are split among them. gloo on the CPU, NCCL with --device cuda (one GPU "
                   "per process). Rank 0 writes --out; a failed job writes nothing. A rank that "
                   "dies ends every rank; one that stops answering, after 30 minutes.")
def bin_command(features_path, bins, labels_path, no_labels, metric, lam, device, backend, sizes, out,
                distributed):
    """Split the samples into N bins with recursive GraphCut."""
    if no_labels and labels_path is not None:
        raise click.UsageError("--labels and --no-labels contradict each other")
    if distributed:
        if backend != "auto":
            raise click.UsageError("--backend applies to single-process runs, not to --distributed")
        from dqkernels.pipeline.distributed_bins import make_bins_distributed

        outcome = make_bins_distributed(
            features_path, bins, out=out, labels=labels_path, use_labels=not no_labels, metric=metric,
            lam=lam, device=device, sizes=sizes,
        )
        if outcome is None:  # not rank 0: rank 0 reports
            return
    else:
        outcome = pipeline.make_bins(
            features_path, bins, out=out, labels=labels_path, use_labels=not no_labels, metric=metric,
            lam=lam, device=device, backend=backend, sizes=sizes,
        )
    result = outcome.result
    click.echo(
        f"{outcome.path}: {result.order.shape[0]} samples in {bins} bins"
        f"{' per class' if result.labels is not None else ''} | backend {result.backend}, "
        f"form {result.form} | {outcome.seconds:.2f} s | sizes {bin_sizes_summary(result.bin_sizes)}"
    )


# --------------------------------------------------------------------------- sample


@cli.command("sample")
@click.option("--bins", "bins_path", required=True, type=_EXISTING_FILE, help="Bins .npz from `dqk bin`.")
@click.option("--ratio", required=True, type=click.FloatRange(0, 1, min_open=True),
              help="Fraction of the samples to keep, in (0, 1].")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the uniform draw in each bin.")
@click.option("--allocation", type=click.Choice(ALLOCATIONS), default="exact", show_default=True,
              help="exact: round(ratio x samples) in total, spread by largest remainder. official: "
                   "round(ratio x count) per bin, as the official code (small ratios can empty bins).")
@click.option("-o", "--out", type=click.Path(dir_okay=False, path_type=Path),
              help="Output .npy of sorted sample ids (+ a .json manifest). Default: subset.npy beside the bins.")
@click.option("--export", "export_dir", type=click.Path(path_type=Path),
              help="Also copy the chosen samples, in the input's own format, into this new directory.")
@click.option("--source", type=click.Path(exists=True, path_type=Path),
              help="The input data for --export. Default: the input recorded by `dqk features`.")
@click.option("--link", is_flag=True, help="With --export of an image folder: symlink instead of copying.")
def sample_command(bins_path, ratio, seed, allocation, out, export_dir, source, link):
    """Keep a fraction of every bin, uniformly at random."""
    subset = pipeline.draw_subset(bins_path, ratio, seed=seed, allocation=allocation)
    if export_dir is not None:  # exported first: a failed export leaves no subset file either
        pipeline.export_subset(
            subset.indices, export_dir, features_sidecar=subset.manifest["features_sidecar"],
            source=source, link=link,
        )
    subset_path = pipeline.save_subset(subset, bins_path, out)
    click.echo(f"{subset_path}: kept {subset.indices.shape[0]} samples (ratio {ratio}, seed {seed}, {allocation})")
    if export_dir is not None:
        click.echo(f"exported {subset.indices.shape[0]} samples to {export_dir}")


# --------------------------------------------------------------------------- run


@cli.command("run")
@click.argument("config_path", metavar="[CONFIG]", required=False, type=_EXISTING_FILE)
@click.option("--input", "input_path", type=click.Path(exists=True, path_type=Path),
              help="Image folder, .npy/.npz images, or .json/.jsonl instruction data.")
@click.option("--work-dir", type=click.Path(file_okay=False, path_type=Path),
              help="Directory for features/, bins.npz and subset.npy.")
@click.option("--model", help="timm model name. Default: resnet18.")
@click.option("--checkpoint", type=_EXISTING_FILE, help="Local weights for --model. Default: random init.")
@click.option("--mode", type=click.Choice(FEATURE_MODES), help="Feature mode. Default: pooled.")
@click.option("--grad-delta", type=click.Choice(GRAD_DELTAS), help="Gradient delta. Default: standard.")
@click.option("--text-model", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Local sentence-embedding model directory for instruction data.")
@click.option("--img-size", type=click.IntRange(min=8), help="Image size in pixels. Default: the model's.")
@click.option("--batch-size", type=click.IntRange(min=1), help="Batch size for features. Default: 64.")
@click.option("--device", type=DEVICE, help="cpu, cuda or cuda:N for features. Default: cuda when available.")
@click.option("--workers", type=click.IntRange(min=0), help="Image-decoding processes. Default: 0.")
@click.option("--bins", type=click.IntRange(min=1), help="Number of bins. Default: 10.")
@click.option("--per-class/--no-per-class", default=None,
              help="Bin each class on its own when labels are known. Default: per class.")
@click.option("--metric", type=click.Choice(METRICS), help="Distance. Default: cosine.")
@click.option("--bin-device", type=DEVICE, help="cpu, cuda or cuda:N for binning. Default: the library's choice.")
@click.option("--backend", type=click.Choice(BACKENDS), help="Kernel backend. Default: auto.")
@click.option("--sizes", type=click.Choice(["split", "official"]), help="Bin sizes rule. Default: split.")
@click.option("--ratio", type=click.FloatRange(0, 1, min_open=True), help="Fraction kept, in (0, 1]. Default: 0.1.")
@click.option("--seed", type=int, help="Sampling seed. Default: 0.")
@click.option("--allocation", type=click.Choice(ALLOCATIONS), help="Per-bin counts rule. Default: exact.")
@click.option("--export", type=click.Path(path_type=Path), help="Write the subset in the input's format here.")
@click.option("--link/--copy", default=None, help="Export images as symlinks instead of copies. Default: copy.")
@click.option("--drop", type=click.FloatRange(0, 1, max_open=True),
              help="Also quantize the subset's pixels: drop this fraction of each image's patches "
                   "(GradCAM++) into WORK_DIR/patches. Default: no pixel stage.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
def run_command(config_path: Optional[Path], quiet: bool, **options):
    """Run features -> bins -> sample (-> export) (-> quantize) in one go, resumably.

    CONFIG is a YAML file of option names (e.g. `input: data/`, `bins: 10`, `ratio: 0.1`;
    also `num_classes`, `lam`, `strict`, `feature_seed`, and for the pixel stage
    `quantize_img_size`, `quantize_grid`, `cam_model`, `cam_checkpoint`, which have no option here), with
    paths relative to the file; command-line options override it. A stage whose inputs and
    options have not changed since its output was written is reused.
    """
    config = pipeline.PipelineConfig.from_yaml(config_path) if config_path else pipeline.PipelineConfig()
    for name, value in options.items():
        if value is not None:
            field_name = "input" if name == "input_path" else name
            setattr(config, field_name, str(value) if isinstance(value, Path) else value)
    pipeline.run_pipeline(config, log=click.echo, progress=_show_progress(quiet))


# --------------------------------------------------------------------------- info


@cli.command("info")
@click.argument("path", type=click.Path(exists=True, path_type=Path))
def info_command(path):
    """Describe a bins .npz, a subset .npy (+ manifest), a feature set or any .npy."""
    click.echo(pipeline.describe(path))


from dqkernels.cli.v2 import v2_command  # noqa: E402

cli.add_command(v2_command)


from dqkernels.cli.pixel import quantize_command, reconstruct_command  # noqa: E402

cli.add_command(quantize_command)
cli.add_command(reconstruct_command)


def main() -> None:
    """Console-script entry point."""
    cli(prog_name="dqk")


if __name__ == "__main__":
    main()
