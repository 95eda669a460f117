"""Shared fixtures: one real local Ray for the session, the demo data built once."""
from __future__ import annotations

import os

import pytest

os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def ray_local():
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def demo_small(tmp_path_factory):
    """A small built-in demo corpus (3 sources) and its tokenizer."""
    from s2l_ray import demo
    from s2l_ray.config import DemoConfig

    cfg = DemoConfig(sources=["gsm_symbolic", "gcd", "basic_arithmetic"], train_per_source=20,
                     eval_per_source=5, vocab_size=512)
    return demo.build(cfg, str(tmp_path_factory.mktemp("demo")))
