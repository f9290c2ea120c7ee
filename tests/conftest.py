import os
import sys

# tests import the top-level scripts (model.py, data.py, ...) as modules
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Tiny models: one thread each is fastest, and on a shared 2-core machine torch's default (one
# thread per core) spins against other processes (a perplexity test went from 4 s to 140 s).
# Set before torch is imported; subprocesses inherit it; an explicit setting wins.
os.environ.setdefault("OMP_NUM_THREADS", "1")
