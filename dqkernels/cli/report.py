"""``dqk report``: one self-contained HTML page about a run or any set of the tool's outputs."""

from __future__ import annotations

from pathlib import Path

import click


@click.command("report")
@click.argument("paths", nargs=-1, required=True, type=click.Path(exists=True, path_type=Path))
@click.option("-o", "--out", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="The .html file to write (replaced whole; never one of the inputs).")
@click.option("--max-points", type=click.IntRange(min=10), default=20000, show_default=True,
              help="At most this many samples (and this many selected ones) in the 2-D projection.")
@click.option("--thumbnails", type=click.IntRange(min=0), default=8, show_default=True,
              help="Images or records shown per bin (and patch-store / Tobias images); 0: none.")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True,
              help="Which samples are drawn when there are more than are shown.")
@click.option("-q", "--quiet", is_flag=True, help="Print nothing on success.")
def report_command(paths, out, max_points, thumbnails, seed, quiet):
    """Write one HTML page (no server, no network) about PATHS: a `dqk run` work directory, a
    feature set, a bins .npz, a subset .npy, an export folder, a patch store or a `dqk v2` output.

    The page shows warnings (random-init features, empty bins or classes, tiny cells, classes
    without a selected sample), a 2-D projection of all samples against the selected ones, the
    bins × classes table, thumbnails or example records per bin, patch-store images with the
    dropped patches greyed and DQ-V2 Tobias images beside their originals. Files the given
    outputs record (a subset's bins and feature set, ...) are read too.
    """
    from dqkernels.pipeline.report_page import write_report

    outcome = write_report(list(paths), out, max_points=max_points, thumbnails=thumbnails, seed=seed)
    if not quiet:
        for line in outcome.warnings:
            click.echo(f"warning: {line}", err=True)
        click.echo(f"report: wrote {outcome.path} ({outcome.images} images, {len(outcome.warnings)} warnings)")
