"""Triton kernels. Each module holds one kernel family, its launcher and nothing else."""
