"""A lint for the Triton kernels: the two habits the interpreter cannot catch are refused.

1. Implicit argmax tie-breaking. The interpreter breaks ``tl.argmax`` ties to the left whatever
   ``tie_break_left`` says, so a kernel relying on it passes every CPU test and may pick another
   sample on a GPU. Kernels write the rule out (maximum, then the smallest index holding it);
   ``tl.argmax`` and ``tl.argmin`` are not allowed in ``dqkernels/graphcut/kernels``.
2. Python floats as kernel arguments. The interpreter keeps them in float64; a GPU launch passes
   them as float32. Float parameters (λ) travel as float64 device tensors instead. Checked in
   the source (float literals or ``float(...)`` in a launch) and at run time (every launch of a
   small binning on every kernel path is recorded and its arguments inspected).
"""

from __future__ import annotations

import ast
import os
from pathlib import Path

import numpy as np
import pytest

KERNEL_DIR = Path(__file__).resolve().parents[1] / "dqkernels" / "graphcut" / "kernels"


def lint_source(source: str, filename: str = "<kernel>") -> list:
    """Problems in one kernel module's source, as 'file:line: message' strings."""
    problems = []
    tree = ast.parse(source, filename)
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            func = node.func
            if isinstance(func, ast.Attribute) and func.attr in ("argmax", "argmin"):
                problems.append((node.lineno, f"{filename}:{node.lineno}: {ast.unparse(func)} breaks ties implicitly"))
            if isinstance(func, ast.Subscript):  # kernel[grid](...): a launch
                for arg in list(node.args) + [k.value for k in node.keywords]:
                    if _is_float_expression(arg):
                        problems.append((arg.lineno, f"{filename}:{arg.lineno}: Python float {ast.unparse(arg)} passed to a kernel"))
    return [message for _, message in sorted(problems)]


def _is_float_expression(node) -> bool:
    if isinstance(node, ast.Constant) and isinstance(node.value, float):
        return True
    if isinstance(node, ast.UnaryOp):
        return _is_float_expression(node.operand)
    if isinstance(node, ast.BinOp):
        return _is_float_expression(node.left) or _is_float_expression(node.right)
    return isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "float"


def test_the_lint_finds_what_it_is_for():
    bad = (
        "@triton.jit\n"
        "def k(x_ptr, lam, BLOCK: tl.constexpr):\n"
        "    i = tl.argmax(tl.load(x_ptr + tl.arange(0, BLOCK)), axis=0, tie_break_left=True)\n"
        "k[(1,)](x, 0.5, BLOCK=16)\n"
        "k[(1,)](x, float(lam), BLOCK=16)\n"
        "k[(1,)](x, -2.0 * lam, BLOCK=16)\n"
    )
    found = lint_source(bad)
    assert len(found) == 4 and "ties implicitly" in found[0] and all("Python float" in f for f in found[1:])


def test_kernels_break_ties_explicitly_and_take_no_float_literals():
    files = sorted(KERNEL_DIR.glob("*.py"))
    assert {"packed_gram.py", "persistent_bins.py", "fused_step.py"} <= {f.name for f in files}
    problems = [p for f in files for p in lint_source(f.read_text(), f.name)]
    assert not problems, "\n".join(problems)


def test_no_launch_passes_a_python_float(monkeypatch, rng):
    torch = pytest.importorskip("torch")
    pytest.importorskip("triton")
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("Triton needs a GPU or TRITON_INTERPRET=1")
    from dqkernels import GradEmbedding, graphcut_bins
    from dqkernels.graphcut import torch_engine
    from dqkernels.graphcut.kernels import fused_step, packed_gram, persistent_bins

    kernels = (packed_gram._packed_gram, persistent_bins._persistent_bins, fused_step._fused_step)
    launches = []
    for kernel_class in {type(k) for k in kernels}:
        original = kernel_class.run

        def recording_run(self, *args, original=original, **kwargs):
            launches.append((self, args, kwargs))
            return original(self, *args, **kwargs)

        monkeypatch.setattr(kernel_class, "run", recording_run)

    device = "cuda" if torch.cuda.is_available() else "cpu"
    x = rng.standard_normal((24, 3))
    labels = np.arange(24) % 2
    graphcut_bins(x, bins=2, labels=labels, lam=0.3, backend="triton", device=device)
    graphcut_bins(GradEmbedding(x, x[:, :2]), bins=2, lam=1.7, backend="triton", device=device, form="stream")
    monkeypatch.setattr(torch_engine, "PERSISTENT_MAX_N", 0)
    graphcut_bins(x, bins=2, lam=2.5, backend="triton", device=device)

    assert {id(launch[0]) for launch in launches} == {id(k) for k in kernels}
    for kernel, args, kwargs in launches:
        name = kernel.fn.__name__
        constexprs = {p for p, a in kernel.fn.__annotations__.items() if "constexpr" in str(a)}
        runtime = list(args) + [v for k, v in kwargs.items() if k in kernel.arg_names and k not in constexprs]
        floats = [v for v in runtime if isinstance(v, float)]
        assert not floats, f"{name} was launched with Python floats {floats}"
