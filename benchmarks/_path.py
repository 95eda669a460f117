"""Imported first by every benchmark: the repo root on sys.path, so that ``s2l_ray`` imports uninstalled."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
