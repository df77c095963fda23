"""Every Triton kernel compiles ahead of time for sm_90a (Hopper) and sm_80 (Ampere) without
register spills.

No GPU is needed: ``triton.compile`` with an explicit target lowers each kernel to PTX, and the
ptxas that ships with Triton assembles it with the flags Triton itself uses, plus ``-v`` for the
resource report. Every launch configuration and dtype variant the engine can launch is built
once per test session, in a subprocess without TRITON_INTERPRET (under the interpreter
``triton.jit`` gives no compilable function), two processes at a time.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from concurrent.futures import ProcessPoolExecutor

import pytest

TARGETS = (90, 80)
RESOURCE = re.compile(
    r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads.*?Used (\d+) registers",
    re.S,
)


def _variants():
    """(name, kernel, signature, constexprs, options) for every compiled form of every kernel."""
    from dqkernels.graphcut.kernels import fused_step, packed_gram, persistent_bins

    out = []
    gram_args = ["x_ptr", "e_ptr", "gram_ptr", "tiles_ptr", "row_offsets_ptr", "gram_offsets_ptr"]
    for rows, precision in (("fp32", "ieee"), ("fp32", "tf32"), ("fp32", "tf32x3"), ("fp64", "ieee"), ("bf16", "ieee")):
        for gradient in (False, True):
            config = packed_gram.config_for(precision, gradient)
            signature = dict(zip(gram_args, [f"*{rows}", f"*{rows}", "*fp64" if rows == "fp64" else "*fp32", "*i32", "*i64", "*i64"]))
            signature.update(d="i32", dim_e="i32", GRADIENT="constexpr", PRECISION="constexpr", BLOCK="constexpr", BLOCK_K="constexpr")
            constexprs = dict(GRADIENT=gradient, PRECISION=precision, BLOCK=config["BLOCK"], BLOCK_K=config["BLOCK_K"])
            name = f"packed_gram-{rows}-{precision}{'-gradient' if gradient else ''}"
            out.append((name, packed_gram._packed_gram, signature, constexprs, dict(num_warps=config["num_warps"])))

    for gram in ("fp32", "fp64"):
        for config in persistent_bins.CONFIGS:
            signature = dict(
                gram_ptr=f"*{gram}", gram_offsets_ptr="*i64", row_offsets_ptr="*i64", norms_ptr="*fp64",
                c2_ptr="*fp64", c1_ptr="*fp64", sizes_ptr="*i64", coef_ptr="*fp64", order_ptr="*i64",
                n_bins="i32", BLOCK="constexpr",
            )
            name = f"persistent_bins-{gram}-block{config['BLOCK']}"
            out.append((name, persistent_bins._persistent_bins, signature, dict(BLOCK=config["BLOCK"]), dict(num_warps=config["num_warps"])))

    stream_variants = [(False, rows, False) for rows in ("fp32", "fp64")]
    stream_variants += [(True, rows, gradient) for rows in ("fp32", "fp64", "bf16") for gradient in (False, True)]
    for stream, rows, gradient in stream_variants:
        config = fused_step.STREAM_CONFIG if stream else fused_step.GRAM_CONFIG
        signature = dict(
            gram_ptr="*fp64" if stream else f"*{rows}", gram_offsets_ptr="*i64",
            x_ptr=f"*{rows}" if stream else "*fp64", e_ptr=f"*{rows}" if stream else "*fp64",
            row_offsets_ptr="*i64", norms_ptr="*fp64", c1_ptr="*fp64", c2_ptr="*fp64", coef_ptr="*fp64",
            pick_ptr="*i64", remaining_ptr="*i64", written_ptr="*i64", order_ptr="*i64",
            block_max_ptr="*fp64", block_pos_ptr="*i64", arrived_ptr="*i32",
            d="i32", dim_e="i32", max_blocks="i32",
            STREAM="constexpr", GRADIENT="constexpr", BLOCK="constexpr", BLOCK_K="constexpr", REDUCE="constexpr",
        )
        constexprs = dict(STREAM=stream, GRADIENT=gradient, BLOCK=config["BLOCK"], BLOCK_K=config["BLOCK_K"], REDUCE=config["REDUCE"])
        name = f"fused_step-{'stream' if stream else 'gram'}-{rows}{'-gradient' if gradient else ''}"
        options = dict(num_warps=config["num_warps"], num_stages=config["num_stages"])
        out.append((name, fused_step._fused_step, signature, constexprs, options))
    return out


def _compile(job):
    """Compile one variant for one target; return its ptxas resource report."""
    import tempfile

    import triton
    import triton.backends.nvidia as nvidia
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    index, capability = job
    name, kernel, signature, constexprs, options = _variants()[index]
    # Torch allocations are 256-byte aligned: pointers are specialised as 16-byte divisible.
    attrs = {(i,): [["tt.divisibility", 16]] for i, kind in enumerate(signature.values()) if kind.startswith("*")}
    source = ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs)
    compiled = triton.compile(source, target=GPUTarget("cuda", capability, 32), options=options)
    ptx = compiled.asm["ptx"]
    arch = f"sm_{capability}a" if capability == 90 else f"sm_{capability}"
    ptxas = os.path.join(os.path.dirname(nvidia.__file__), "bin", "ptxas")
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "kernel.ptx")
        with open(path, "w") as handle:
            handle.write(ptx)
        report = subprocess.run(
            [ptxas, "-lineinfo", "-v", "--regAllocOptLevel=2", f"--gpu-name={arch}", path, "-o", path + ".o"],
            capture_output=True, text=True, check=True,
        ).stderr
    match = RESOURCE.search(report)
    stack, spill_stores, spill_loads, registers = (int(v) for v in match.groups())
    return dict(
        name=name, arch=arch, registers=registers, stack=stack,
        spill_stores=spill_stores, spill_loads=spill_loads, shared=int(compiled.metadata.shared),
        wgmma="wgmma" in ptx,
    )


def compile_all(workers: int = 2) -> list:
    jobs = [(index, capability) for index in range(len(_variants())) for capability in TARGETS]
    with ProcessPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(_compile, jobs))


@pytest.fixture(scope="session")
def compiled():
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run(
        [sys.executable, __file__], capture_output=True, text=True, env=env, timeout=900,
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    )
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_every_kernel_variant_compiles_for_both_targets(compiled):
    names = {row["name"] for row in compiled}
    assert len(compiled) == len(names) * len(TARGETS)
    assert {row["arch"] for row in compiled} == {"sm_90a", "sm_80"}
    for prefix in ("packed_gram", "persistent_bins", "fused_step-gram", "fused_step-stream"):
        assert any(name.startswith(prefix) for name in names), prefix


def test_no_kernel_spills_registers(compiled):
    spilling = [row for row in compiled if row["spill_stores"] or row["spill_loads"] or row["stack"]]
    assert not spilling, f"kernels with spills or a stack frame: {spilling}"


def test_tensor_core_gram_uses_wgmma_on_hopper(compiled):
    # tf32 and bfloat16 products go to the Hopper tensor-core instruction, full float32 does not.
    by_name = {(row["name"], row["arch"]): row for row in compiled}
    assert by_name[("packed_gram-fp32-tf32", "sm_90a")]["wgmma"]
    assert by_name[("packed_gram-bf16-ieee", "sm_90a")]["wgmma"]
    assert not by_name[("packed_gram-fp32-ieee", "sm_90a")]["wgmma"]


if __name__ == "__main__":
    if os.environ.get("TRITON_INTERPRET") == "1":
        sys.exit("run without TRITON_INTERPRET: the interpreter has nothing to compile")
    print(json.dumps(compile_all()))
