"""``python -m dqkernels.cli`` (e.g. under torchrun) runs ``dqk``."""

from dqkernels.cli.main import main

main()
