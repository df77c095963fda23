"""The streaming form never allocates an M×M matrix."""

import json
import subprocess
import sys
import textwrap


def test_streaming_form_at_200k_samples_stays_small():
    # M = 200 000: an M×M float32 matrix would be 160 GB. Two small greedy bins, then the rest.
    script = textwrap.dedent(
        r"""
        import json, re
        import numpy as np
        from dqkernels import graphcut_bins
        m = 200_000
        x = np.random.default_rng(0).standard_normal((m, 64)).astype(np.float32)
        result = graphcut_bins(x, bins=3, sizes=[12, 12, m - 24])
        # VmHWM: this process image's peak resident memory (ru_maxrss would include the parent's)
        status = open("/proc/self/status").read()
        peak_mb = int(re.search(r"VmHWM:\s+(\d+) kB", status).group(1)) / 1024
        print(json.dumps({"form": result.form, "peak_mb": peak_mb,
                          "sizes": result.bin_sizes.tolist()}))
        """
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["form"] == "stream"
    assert report["sizes"] == [12, 12, 199_976]
    # Features (51 MB) plus the float64 working copy and the pool copy: well under 1 GB.
    assert report["peak_mb"] < 1024, report


def test_byte_swapped_and_half_precision_memory_maps_are_converted_chunk_by_chunk(tmp_path):
    # numpy reports its buffers to tracemalloc: the peak while binning must be one float32
    # working copy (M×d×4 bytes) plus bounded chunk temporaries (about 20 MB), not a whole
    # float64 (M×d×8) or float32 copy of the input on top of it.
    import tracemalloc

    import numpy as np

    from dqkernels import graphcut_bins

    m, d = 400_000, 32
    x = np.random.default_rng(0).standard_normal((m, d))
    working_copy = m * d * 4
    for dtype in (">f4", "<f2", ">f2"):
        path = tmp_path / f"features-{dtype.replace('>', 'be').replace('<', 'le')}.npy"
        np.save(path, x.astype(dtype))
        features = np.load(path, mmap_mode="r")
        tracemalloc.start()
        result = graphcut_bins(features, bins=3, sizes=[8, 8, m - 16], form="stream")
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert result.meta["precision"] == "float32", dtype
        assert peak - working_copy < 32e6, (dtype, peak / working_copy)
