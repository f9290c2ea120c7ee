"""bench.py must keep running (it is a benchmark: nothing here is timed or compared), and the
numbers it prints must be consistent with each other."""
import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_bench_runs_on_cpu():
    p = subprocess.run([sys.executable, "bench.py", "--seq_len=64", "--steps=1", "--warmup=0", "--prefix=48", "--queries=2",
                        "--batch_size=2", "--device=cpu"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert p.returncode == 0, p.stderr[-2000:]
    assert "tok/s" in p.stdout and "eval prefix 48 tokens" in p.stdout and "max score diff" in p.stdout
    assert "prefix cache file (" in p.stdout
    # tokens per second = batch * seq_len tokens over the step time, as printed (ms rounded to 1)
    m = re.search(r"train step .*?(\d+) ms +(\d+) tok/s", p.stdout)
    assert m, p.stdout
    ms, tok_s, tokens = int(m[1]), int(m[2]), 2 * 64
    assert ms > 0 and tokens / ((ms + 0.5) / 1000) - 0.5 <= tok_s <= tokens / (max(ms - 0.5, 1e-3) / 1000) + 0.5, m[0]
    # the shared-prefix cache scores what re-encoding every prompt scores (fp32: to rounding)
    diff = float(re.search(r"max score diff ([0-9.e+-]+)", p.stdout)[1])
    assert diff < 1e-4, diff
