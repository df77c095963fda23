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
