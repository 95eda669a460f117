"""Choosing the subset: the allocation rules (pure), the methods (one registered function each), and the
stage that runs a method over a run directory and writes the selection."""
