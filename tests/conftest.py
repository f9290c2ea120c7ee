import os
import sys

# tests import the top-level scripts (model.py, data.py, ...) as modules
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
