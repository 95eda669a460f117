"""models: local-only loading, clear errors for bad directories, no remote code, safetensors only."""
from __future__ import annotations

import json

import pytest
import torch

from s2l_ray.models import ModelError, build_model, load_model, load_tokenizer, save_model


@pytest.fixture(scope="module")
def saved(demo_small, tmp_path_factory):
    tok = load_tokenizer(demo_small["tokenizer"])
    model = build_model("tiny", tok, seed=3)
    return model, save_model(model, tok, str(tmp_path_factory.mktemp("m") / "model"))


def test_saved_model_reloads_identically_from_safetensors_only(saved):
    model, path = saved
    from pathlib import Path

    files = {p.name for p in Path(path).iterdir()}
    assert "model.safetensors" in files and not {f for f in files if f.endswith((".bin", ".pt", ".pth"))}
    again = load_model(path)
    ids = torch.tensor([[1, 5, 9, 2]])
    with torch.no_grad():
        torch.testing.assert_close(again(input_ids=ids).logits, model(input_ids=ids).logits, rtol=0, atol=0)


def test_missing_or_non_model_directories_are_refused(tmp_path):
    with pytest.raises(ModelError, match=f"model directory does not exist: {tmp_path / 'nope'}"):
        load_model(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="no config.json, not a Hugging Face model directory"):
        load_model(str(tmp_path / "empty"))
    with pytest.raises(ModelError, match=f"tokenizer directory does not exist: {tmp_path / 'nope'}"):
        load_tokenizer(str(tmp_path / "nope"))
    with pytest.raises(ModelError, match="not a tokenizer directory"):
        load_tokenizer(str(tmp_path / "empty"))


def test_a_model_that_is_not_a_causal_lm_is_refused(tmp_path):
    from transformers import ViTConfig

    ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64).save_pretrained(tmp_path)
    with pytest.raises(ModelError, match="model type 'vit' is not a causal language model"):
        load_model(str(tmp_path))


def test_remote_code_is_never_run_unless_asked(tmp_path):
    marker = tmp_path / "ran"
    (tmp_path / "modeling_evil.py").write_text(f"open({str(marker)!r}, 'w').write('x')\n")
    (tmp_path / "configuration_evil.py").write_text(
        f"open({str(marker)!r}, 'w').write('x')\nfrom transformers import PretrainedConfig\n"
        "class EvilConfig(PretrainedConfig):\n    model_type = 'evil'\n")
    (tmp_path / "config.json").write_text(json.dumps({
        "model_type": "evil", "auto_map": {"AutoConfig": "configuration_evil.EvilConfig",
                                           "AutoModelForCausalLM": "modeling_evil.EvilModel"}}))
    with pytest.raises(ModelError, match="unreadable model config"):
        load_model(str(tmp_path))
    assert not marker.exists()


def test_corrupt_weights_are_a_clear_error(saved, tmp_path):
    import shutil

    _, path = saved
    bad = tmp_path / "bad"
    shutil.copytree(path, bad)
    (bad / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ModelError, match="cannot load weights"):
        load_model(str(bad))
