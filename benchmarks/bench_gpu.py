"""GraphCut bins on a CUDA GPU: the Triton kernels against the torch engine, timed in the same run.

    python benchmarks/bench_gpu.py --out gpu_out          # all cases, table + gpu.json in gpu_out/
    pytest benchmarks/bench_gpu.py -m gpu                 # the same cases as pytest (skipped without CUDA)

Cases (cosine, float32 CUDA tensors, standard normal + 0.3, fresh draws per run):
- imagenet-per-class: 1 000 classes × 1 300 × 768, 10 bins (target ≤ 20 ms end to end);
- cifar-per-class: 10 classes × 5 000 × 512, 10 bins (target ≤ 25 ms);
- global-50000x512: one problem, 10 bins (target ≤ 0.25 s);
- global-stream-200000x512: one problem whose Gram matrix (160 GB) does not fit, streaming
  form, timed over its first ``STREAM_STEPS`` greedy steps (sizes = [k, rest]).
Each case times ``graphcut_bins`` end to end from the CUDA tensor (front end, Gram, greedy, the
order back on the host; median of the timed runs after one warm-up run that compiles), then the
phases separately: front end, Gram, greedy loop. µs per step = greedy time / greedy steps of the
largest problem; bandwidth = the bytes a step must move (Gram row or pool features, plus the
per-sample float64 state read and written) over that time, as a fraction of the device-to-device
copy bandwidth measured in the same run. The torch engine (``backend="torch"``) runs each case
too, once, over at most ``BASELINE_STEPS`` steps where a full run would take too long.

The Gram precision study bins 4 classes × 3 000 × 512 with each Gram precision of the engine
(tf32x3, ieee, tf32, bf16) and replays the result in float64 (docs/method.md §2): worst gap and
whether it holds at rtol 1e-4.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from types import SimpleNamespace

import numpy as np
import pytest
import torch

BINS = 10
STREAM_STEPS = 1000
BASELINE_STEPS = 2000
# name: (classes, samples per class, dims, form, steps cap (None: full run), target seconds)
CASES = {
    "imagenet-per-class": (1000, 1300, 768, "auto", None, 0.020),
    "cifar-per-class": (10, 5000, 512, "auto", None, 0.025),
    "global-50000x512": (1, 50000, 512, "auto", None, 0.25),
    "global-stream-200000x512": (1, 200000, 512, "stream", STREAM_STEPS, None),
}
GRAM_PRECISIONS = ("tf32x3", "ieee", "tf32", "bf16")


def _sync():
    torch.cuda.synchronize()


def copy_bandwidth() -> float:
    """Device-to-device copy bandwidth in bytes/s (bytes read + bytes written), median of 10."""
    source = torch.randn(1 << 28, device="cuda")
    target = torch.empty_like(source)
    times = []
    for _ in range(12):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        target.copy_(source)
        stop.record()
        _sync()
        times.append(start.elapsed_time(stop) / 1e3)
    return 2 * source.numel() * 4 / statistics.median(times[2:])


def _inputs(classes, per_class, dims, seed):
    generator = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn((classes * per_class, dims), device="cuda", generator=generator) + 0.3
    labels = None
    if classes > 1:
        labels = torch.arange(classes, device="cuda").repeat_interleave(per_class)
        labels = labels[torch.randperm(len(labels), device="cuda", generator=generator)]
    return x, labels


def _sizes(m, cap):
    """None for a full 10-bin run, else [cap, rest] (one problem only)."""
    return "split" if cap is None else [cap, m - cap]


def _timed(fn):
    _sync()
    start = time.perf_counter()
    out = fn()
    _sync()
    return out, time.perf_counter() - start


def _phases(x, labels, sizes, form, backend, gram_precision) -> dict:
    """One binning phase by phase: seconds of the front end, the Gram matrix (Triton, Gram form)
    and the engine; the greedy steps of the largest problem, the form and kernel, the problems,
    the class grouping and the engine's local order."""
    from dqkernels.graphcut import device_prepare, torch_engine
    from dqkernels.graphcut.kernels.packed_gram import packed_gram
    from dqkernels.graphcut.sizes import bin_sizes_per_problem

    out = {}

    def front():
        prepared = device_prepare.device_features(x, "cuda")
        label_tensor = None if labels is None else device_prepare.device_labels(labels, prepared.m, "cuda")
        perm, counts = device_prepare.group_by_label(label_tensor, prepared.m, "cuda")
        offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        working, _ = device_prepare.working_features(prepared, "cosine", perm, offsets, torch.float32)
        bin_sizes = bin_sizes_per_problem(counts, BINS if isinstance(sizes, str) else len(sizes), sizes)
        return torch_engine.Problems(working, None, offsets, bin_sizes), perm

    (problems, perm), out["front_end"] = _timed(front)
    free = torch.cuda.mem_get_info()[0]
    chosen = torch_engine.choose_form(problems, form, free, padded=backend == "torch", gram_precision=gram_precision)
    if chosen == "gram" and backend == "triton":
        rows = problems.x.to(torch.bfloat16) if gram_precision == "bf16" else problems.x
        precision = "ieee" if gram_precision == "bf16" else gram_precision
        _, out["gram"] = _timed(lambda: packed_gram(rows, None, problems.counts, precision))
    if backend == "triton":
        run, out["engine"] = _timed(lambda: torch_engine.run_triton(problems, 1.0, chosen, gram_precision))
    else:
        run, out["engine"] = _timed(lambda: torch_engine.run_torch(problems, 1.0, chosen, gram_precision))
    out["greedy"] = out["engine"] - out.get("gram", 0.0)
    steps = int(problems.bin_sizes[:, :-1].sum(axis=1).max())
    return dict(seconds=out, steps=steps, form=chosen, kernel=run.kernel, problems=problems, perm=perm, run=run)


def _step_bytes(problems, form, steps):
    """Bytes the greedy loop must move over ``steps`` steps of every problem: per sample the
    Gram row entry (or its feature row) and norms, C1, C2 read and C1, C2 written."""
    counts = problems.counts.astype(np.float64)
    row = 4.0 if form == "gram" else problems.x.shape[1] * problems.x.element_size()
    return float((counts * (row + 8 * 5)).sum()) * steps


def run_case(name, bandwidth, repeats=3, with_baseline=True) -> list:
    from dqkernels import graphcut_bins

    classes, per_class, dims, form, cap, target = CASES[name]
    rows = []
    for backend in ("triton", "torch") if with_baseline else ("triton",):
        capped = cap
        if backend == "torch" and (classes == 1) and cap is None:
            capped = BASELINE_STEPS
        if backend == "torch" and classes == 1 and cap is not None:
            capped = min(cap, BASELINE_STEPS // 10)
        x, labels = _inputs(classes, per_class, dims, seed=1)
        sizes = _sizes(len(x), capped)
        bins = BINS if isinstance(sizes, str) else len(sizes)
        def run(x, labels):
            return lambda: graphcut_bins(x, bins=bins, labels=labels, sizes=sizes, form=form, backend=backend)

        result, _ = _timed(run(x, labels))  # warm-up: compiles the kernels
        totals = []
        for seed in range(2, 2 + (repeats if backend == "triton" else 1)):
            x, labels = _inputs(classes, per_class, dims, seed)  # fresh inputs every repeat
            result, seconds = _timed(run(x, labels))
            totals.append(seconds)
        phased = _phases(x, labels, sizes, form, backend, "tf32x3")
        phases, steps, problems = phased["seconds"], phased["steps"], phased["problems"]
        per_step = phases["greedy"] / max(steps, 1)
        moved = _step_bytes(problems, phased["form"], steps) / max(phases["greedy"], 1e-12)
        total = statistics.median(totals)
        rows.append(dict(
            case=name, engine=backend, kernel=result.backend, form=result.form, M=len(x), d=dims,
            classes=classes, steps=steps, full_run=capped is None, seconds=total,
            target_s=target if capped is None else None,
            meets_target=(total <= target) if (target and capped is None) else None,
            front_end_s=phases["front_end"], gram_s=phases.get("gram"), greedy_s=phases["greedy"],
            us_per_step=per_step * 1e6, bandwidth_fraction=moved / bandwidth,
        ))
        del x, labels, result, problems, phased
        torch.cuda.empty_cache()
    return rows


def precision_study() -> list:
    """Bins of 4 × 3 000 × 512 with each Gram precision, replayed in float64."""
    from dqkernels.graphcut import torch_engine
    from dqkernels.graphcut.testing import check_binning

    x, labels = _inputs(4, 3000, 512, seed=7)
    host, host_labels = x.cpu().numpy(), labels.cpu().numpy()
    rows = []
    for precision in GRAM_PRECISIONS:
        phased = _phases(x, labels, "split", "gram", "triton", precision)
        problems = phased["problems"]
        order, offsets = torch_engine.assemble(phased["run"].local_order, phased["perm"], problems.offsets, problems.bin_sizes)
        result = SimpleNamespace(order=order.cpu().numpy(), bin_offsets=offsets, labels=host_labels, meta={"metric": "cosine", "lam": 1.0})
        try:
            gap = check_binning(result, host, labels=host_labels, rtol=1.0).worst_gap
        except AssertionError as error:  # not a partition, or a pick outside the pool
            gap = f"invalid: {error}"
        rows.append(dict(
            precision=precision, gram_s=phased["seconds"].get("gram"), worst_gap=gap,
            holds_at_1e_4=isinstance(gap, float) and gap <= 1e-4,
        ))
    return rows


def _table(rows) -> str:
    lines = ["| case | engine | kernel | form | seconds | target | µs/step | HBM fraction | front end s | Gram s |", "|---|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        target = "–" if not r["target_s"] else f"{r['target_s']} ({'met' if r['meets_target'] else 'missed'})"
        full = "" if r["full_run"] else f" ({r['steps']} steps)"
        gram = "–" if r["gram_s"] is None else f"{r['gram_s']:.4f}"
        lines.append(
            f"| {r['case']}{full} | {r['engine']} | {r['kernel']} | {r['form']} | {r['seconds']:.4f} | {target} | "
            f"{r['us_per_step']:.1f} | {r['bandwidth_fraction']:.2f} | {r['front_end_s']:.4f} | {gram} |"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.environ.get("OUT", "gpu_out"))
    parser.add_argument("--budget-s", type=float, default=230.0, help="skip cases that would start after this")
    parser.add_argument("--cases", nargs="*", default=list(CASES))
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to benchmark")
        return 0
    os.makedirs(args.out, exist_ok=True)
    started = time.perf_counter()
    bandwidth = copy_bandwidth()
    report = dict(
        device=torch.cuda.get_device_name(), date=time.strftime("%Y-%m-%d"), torch=torch.__version__,
        command=" ".join([os.path.basename(sys.executable)] + sys.argv), copy_bandwidth_bytes_per_s=bandwidth,
        cases=[], errors={}, precision=[],
    )
    path = os.path.join(args.out, "gpu.json")
    for name in args.cases + ["precision"]:
        if time.perf_counter() - started > args.budget_s:
            report["errors"][name] = "skipped: time budget spent"
            continue
        try:
            if name == "precision":
                report["precision"] = precision_study()
            else:
                report["cases"] += run_case(name, bandwidth)
        except Exception as error:  # one failing case must not hide the others' figures
            report["errors"][name] = f"{type(error).__name__}: {error}"
        with open(path, "w") as handle:
            json.dump(report, handle, indent=1, default=str)
        print(f"[{time.perf_counter() - started:.0f} s] {name} done", flush=True)
    table = _table(report["cases"])
    with open(os.path.join(args.out, "gpu_table.md"), "w") as handle:
        handle.write(f"{report['device']}, {report['date']}, copy bandwidth {bandwidth / 1e12:.2f} TB/s\n\n{table}\n")
    print(table)
    print(json.dumps(report["precision"], default=str))
    print(json.dumps(report["errors"]))
    return 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("case", list(CASES))
def test_gpu_case(benchmark, case):
    bandwidth = copy_bandwidth()
    rows = benchmark.pedantic(run_case, args=(case, bandwidth), rounds=1, iterations=1)
    benchmark.extra_info.update(rows=rows, copy_bandwidth=bandwidth)


if __name__ == "__main__":
    sys.exit(main())
