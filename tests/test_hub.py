"""Hub ids, offline: a Hugging Face cache built here (``models--org--name/snapshots/<hash>`` with ``refs/main``
holding the hash; ``datasets--org--name`` likewise; conftest's ``hub_cache``), read with ``HF_HUB_OFFLINE=1``
through ``jobs/select.py``, with the imported SmolLM2 cut as the model: the latest and a pinned revision resolve and
are recorded, a missing revision and an unknown name are one ``error:`` line, and a local folder of the same name
wins. The selection is the session's ``hub_chat_run``, which tests/test_real_model.py reads as well."""
from __future__ import annotations

import re
import shutil

import pytest

from helpers import CHAT_SELECTION, HUB_MAIN, HUB_PINNED, select_offline

pytestmark = pytest.mark.slow

SMALL = ["--budget", "12", "--clusters", "3", "--set", "proxy.epochs=1", "--set", "proxy.num_points=2"]


def error_line(proc) -> str:
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2 and len(errors) == 1, proc.stderr[-3000:]
    return errors[0]


def test_hub_ids_resolve_offline_pinned_and_recorded(hub_cache, hub_chat_run, chat_target, tmp_path):
    cfg, manifest, _ = hub_chat_run
    assert manifest["hub"] == {
        "corpus.path": {"id": "org/chat", "repo_type": "dataset", "revision": HUB_MAIN},
        "proxy.model": {"id": "org/smol", "repo_type": "model", "revision": HUB_PINNED}}
    assert manifest["config"]["proxy"]["model"].endswith(f"models--org--smol/snapshots/{HUB_PINNED}")
    assert [i["uri"] for i in manifest["corpus"]["inputs"]] == [
        str(hub_cache / "datasets--org--chat" / "snapshots" / HUB_MAIN / "data" / "chat.jsonl")]  # the card is no data
    # the latest revision is another snapshot (its tokenizer too): refused like any other input, never mixed
    proc = select_offline(hub_cache, tmp_path, "--data", "org/chat", "--proxy-model", "org/smol",
                          "--target", str(chat_target), "--output", cfg.output, *CHAT_SELECTION)
    assert "holds trajectories of another" in error_line(proc)


@pytest.mark.parametrize("args,message", [
    (["--proxy-model", "org/smol@" + "c" * 40], r"proxy\.model 'org/smol@c+' is neither a local path nor a Hub model "
                                                r"that resolves offline"),
    (["--proxy-model", "org/absent"], r"proxy\.model 'org/absent' is neither a local path nor a Hub model"),
    (["--set", "text.tokenizer=org/absent"], r"text\.tokenizer 'org/absent' is neither a local path nor a Hub model"),
])
def test_a_hub_id_that_does_not_resolve_is_one_error(hub_cache, demo_small, tmp_path, args, message):
    proc = select_offline(hub_cache, tmp_path, "--data", demo_small["train"], "--output", str(tmp_path / "run"),
                          *args, *SMALL)
    assert re.search(message, error_line(proc))
    assert not (tmp_path / "run").exists()


def test_a_local_folder_of_the_same_name_wins(hub_cache, smollm2_proxy, tmp_path, monkeypatch):
    from huggingface_hub import constants

    from s2l_ray import hub

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # read from the environment when it was imported
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub_cache))
    monkeypatch.chdir(tmp_path)
    path, record = hub.resolve("org/smol", "proxy.model")
    assert record == {"id": "org/smol", "repo_type": "model", "revision": HUB_MAIN} and path.endswith(HUB_MAIN)
    shutil.copytree(smollm2_proxy, tmp_path / "org" / "smol")
    assert hub.resolve("org/smol", "proxy.model") == ("org/smol", None)  # read as the local folder it is
