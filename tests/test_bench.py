"""bench.py must keep running (it is a benchmark: nothing here is timed or compared)."""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_bench_runs_on_cpu():
    p = subprocess.run([sys.executable, "bench.py", "--seq_len=64", "--steps=1", "--warmup=0", "--prefix=48", "--queries=2"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert p.returncode == 0, p.stderr[-2000:]
    assert "tok/s" in p.stdout and "eval prefix 48 tokens" in p.stdout and "max score diff" in p.stdout
    assert "prefix cache file (" in p.stdout
