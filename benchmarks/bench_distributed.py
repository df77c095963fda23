"""Per-step communication of row-sharded bin generation, and the whole distributed step.

    python benchmarks/bench_distributed.py                                 # gloo, CPU, worlds 2-4
    python benchmarks/bench_distributed.py --backend nccl --worlds 1 2 4 8  # one GPU per rank
    python benchmarks/bench_distributed.py --json benchmarks/results/distributed-gloo.json

Every greedy step of ``graphcut_bins_distributed(mode="rows")`` makes two collective calls:
an all-gather of each rank's (score, position, norm) — 24 bytes per rank — and the winning row
(d float64) from its owner to every rank: a broadcast on gloo, an all-reduce to which the other
ranks add zeros on NCCL (the owner's rank then never has to reach the host). This script times,
per step (median over --steps calls, the slowest rank's median):

- ``proposal-allgather``: the first call;
- ``row-broadcast`` and ``row-allreduce``: the two ways of shipping the row;
- ``exchange``: the library's pair of calls, back to back, as one step makes them;
- ``fused-allgather``: one all-gather of every rank's proposal and candidate row, an alternative
  (one round trip, but world·d values per rank);
- ``step``: a whole step of the library — ``graphcut_bins_distributed`` on --samples random
  rows split among the ranks, 2 bins (samples/2 greedy steps), total time / steps;
- ``single-process-step``: the same for the C++ engine (streaming form) in one process.

Records are JSON lines {"op", "backend", "world", "dims", "samples", "seconds"} (``--json``),
and a table on stdout. Ranks talk over loopback only (gloo) or the local GPUs (NCCL).
"""

from __future__ import annotations

import argparse
import datetime
import json
import multiprocessing
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _median_seconds(run, steps: int, synchronize) -> float:
    """Median wall time of ``run(step)`` over ``steps`` calls, after steps // 10 warm-up calls."""
    for step in range(max(1, steps // 10)):
        run(step)
    synchronize()
    times = np.empty(steps)
    for step in range(steps):
        started = time.perf_counter()
        run(step)
        synchronize()
        times[step] = time.perf_counter() - started
    return float(np.median(times))


def _row_ops(dims: int, world: int, backend: str, device, proposal, proposals) -> dict:
    """{op name: run(step)} for the collectives that move a row of ``dims`` float64 values."""
    import torch
    import torch.distributed as dist

    gather_into = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    row = torch.zeros(dims, dtype=torch.float64, device=device)
    fused = torch.zeros(dims + 3, dtype=torch.float64, device=device)
    fused_all = torch.empty((dims + 3) * world, dtype=torch.float64, device=device)

    def all_reduce(step):
        dist.all_reduce(row)

    def broadcast(step):
        dist.broadcast(row, src=step % world)

    share_row = broadcast if backend == "gloo" else all_reduce  # what the library uses

    def exchange(step):
        gather_into(proposals, proposal)
        share_row(step)

    return {
        "row-allreduce": all_reduce,
        "row-broadcast": broadcast,
        "exchange": exchange,
        "fused-allgather": lambda step: gather_into(fused_all, fused),
    }


def _rank_main(rank: int, world: int, store: str, options: dict, results_path: str) -> None:
    """One rank: time every op for every row size, then the whole step; rank 0 writes records."""
    import torch
    import torch.distributed as dist

    from dqkernels.graphcut.distributed import graphcut_bins_distributed

    backend = options["backend"]
    if backend == "nccl":
        torch.cuda.set_device(rank)
        device = torch.device("cuda", rank)
        synchronize = torch.cuda.synchronize
    else:
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
        os.environ["LOCAL_WORLD_SIZE"] = str(world)  # the ranks share the cores, as under torchrun
        device = torch.device("cpu")

        def synchronize():
            return None

    dist.init_process_group(
        backend,
        init_method=f"file://{store}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=120),
    )
    gather_into = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    records = []

    def record(op: str, dims, samples, seconds: float) -> None:
        slowest = torch.tensor([seconds], dtype=torch.float64, device=device)
        dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
        records.append(
            {
                "op": op,
                "backend": backend,
                "world": world,
                "dims": dims,
                "samples": samples,
                "seconds": float(slowest.item()),
            }
        )

    steps = options["steps"]
    proposal = torch.zeros(3, dtype=torch.float64, device=device)
    proposals = torch.empty(3 * world, dtype=torch.float64, device=device)
    record(
        "proposal-allgather",
        None,
        None,
        _median_seconds(lambda step: gather_into(proposals, proposal), steps, synchronize),
    )
    for dims in options["dims"]:
        for op, run in _row_ops(dims, world, backend, device, proposal, proposals).items():
            record(op, dims, None, _median_seconds(run, steps, synchronize))

    rng = np.random.default_rng(0)
    for samples in options["samples"]:
        for dims in options["dims"]:
            features = rng.standard_normal((samples, dims)).astype(np.float32)
            dist.barrier()
            started = time.perf_counter()
            graphcut_bins_distributed(features, bins=2, mode="rows", device=device)
            synchronize()
            record("step", dims, samples, (time.perf_counter() - started) / (samples // 2))
    if rank == 0:
        Path(results_path).write_text("".join(json.dumps(r) + "\n" for r in records))
    dist.destroy_process_group()


def _run_world(world: int, options: dict) -> list:
    """Spawn ``world`` ranks, wait for them (bounded), return rank 0's records."""
    context = multiprocessing.get_context("spawn")
    with tempfile.TemporaryDirectory() as scratch:
        results_path = os.path.join(scratch, "records.jsonl")
        processes = [
            context.Process(
                target=_rank_main, args=(rank, world, os.path.join(scratch, "store"), options, results_path)
            )
            for rank in range(world)
        ]
        for process in processes:
            process.start()
        deadline = time.monotonic() + options["timeout"]
        for process in processes:
            process.join(max(0.0, deadline - time.monotonic()))
        for process in processes:
            if process.is_alive():
                process.kill()
                process.join()
        if any(process.exitcode != 0 for process in processes):
            raise SystemExit(f"world {world}: ranks exited with {[p.exitcode for p in processes]}")
        return [json.loads(line) for line in Path(results_path).read_text().splitlines()]


def _single_process_steps(dims_list, samples_list) -> list:
    """The C++ engine's streaming step in this process, on the same inputs as the ``step`` op."""
    import dqkernels

    rng = np.random.default_rng(0)
    records = []
    for samples in samples_list:
        for dims in dims_list:
            features = rng.standard_normal((samples, dims)).astype(np.float32)
            started = time.perf_counter()
            dqkernels.graphcut_bins(features, bins=2, form="stream")
            records.append(
                {
                    "op": "single-process-step",
                    "backend": "cpp",
                    "world": 1,
                    "dims": dims,
                    "samples": samples,
                    "seconds": (time.perf_counter() - started) / (samples // 2),
                }
            )
    return records


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", choices=["gloo", "nccl"], default="gloo")
    parser.add_argument("--worlds", type=int, nargs="+", default=[2, 3, 4], help="world sizes to time")
    parser.add_argument("--dims", type=int, nargs="+", default=[64, 512, 2048], help="row sizes d")
    parser.add_argument(
        "--samples",
        type=int,
        nargs="+",
        default=[2000, 8000],
        help="samples M of the whole-step runs (split among the ranks)",
    )
    parser.add_argument("--steps", type=int, default=400, help="timed calls per op")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds before a world is killed")
    parser.add_argument("--json", type=Path, help="also append the records to this JSON-lines file")
    args = parser.parse_args()
    options = {key: getattr(args, key) for key in ("backend", "dims", "samples", "steps", "timeout")}
    records = _single_process_steps(args.dims, args.samples)
    for world in args.worlds:
        records += _run_world(world, options)
    print(f"{'op':<20}{'backend':<8}{'world':>6}{'dims':>6}{'samples':>9}{'us/step':>10}")
    for r in records:
        print(
            f"{r['op']:<20}{r['backend']:<8}{r['world']:>6}{r['dims'] or '-':>6}{r['samples'] or '-':>9}"
            f"{r['seconds'] * 1e6:>10.1f}"
        )
    if args.json:
        with args.json.open("a") as handle:
            handle.writelines(json.dumps(r) + "\n" for r in records)


if __name__ == "__main__":
    main()
