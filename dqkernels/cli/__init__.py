"""``dqk``: the command-line tool. Thin click commands over :mod:`dqkernels.pipeline`,
:mod:`dqkernels.pixel` and :mod:`dqkernels.v2`."""

from dqkernels.cli.main import cli, main

__all__ = ["cli", "main"]
