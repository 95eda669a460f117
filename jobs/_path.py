"""Imported first by every job: put the repo root on sys.path in place of jobs/.

Python puts a script's folder first on sys.path, where jobs/select.py would shadow the
standard library's ``select`` module; the repo root makes ``s2l_ray`` importable uninstalled.
"""
import os
import sys

_jobs = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _jobs]
sys.path.insert(0, os.path.dirname(_jobs))
