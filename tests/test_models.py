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


# --- a real pretrained model: SmolLM2-135M-Instruct imported from GGUF (fixtures in conftest.py) ---

def _chat_ids(tok, question: str) -> dict:
    return tok.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                   return_tensors="pt", return_dict=True)


@pytest.fixture(scope="module")
def smol(smollm2):
    """The imported SmolLM2, loaded once for the module."""
    return load_tokenizer(smollm2), load_model(smollm2)


def test_imported_gguf_is_a_plain_hf_directory(smollm2):
    from pathlib import Path

    files = {p.name for p in Path(smollm2).iterdir()}
    assert {"model.safetensors", "config.json", "generation_config.json", "tokenizer.json"} <= files
    assert not {f for f in files if f.endswith((".bin", ".pt", ".pth", ".gguf"))}
    config = json.loads((Path(smollm2) / "config.json").read_text())
    assert "quantization_config" not in config
    assert (config["model_type"], config["num_hidden_layers"], config["vocab_size"]) == ("llama", 30, 49152)
    gen = json.loads((Path(smollm2) / "generation_config.json").read_text())
    assert gen["eos_token_id"] == 2 and gen["pad_token_id"] == 2
    assert not any(p.name.startswith(".") for p in Path(smollm2).parent.iterdir() if "partial" in p.name)


def test_imported_tokenizer_keeps_its_chat_template_and_special_tokens(smol):
    tok, model = smol
    assert tok.chat_template and "<|im_start|>" in tok.chat_template
    assert (tok.eos_token, tok.eos_token_id, tok.pad_token_id, len(tok)) == ("<|im_end|>", 2, 2, 49152)
    assert tok("What is 2+2?").input_ids[0] != tok.bos_token_id  # SmolLM2 adds no BOS
    assert model.generation_config.eos_token_id == 2
    assert 120e6 < sum(p.numel() for p in model.parameters()) < 140e6


def test_imported_model_answers_a_chat_question(smol):
    tok, model = smol
    ids = _chat_ids(tok, "What is 2+2?")
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=24, do_sample=False)
    answer = tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "4" in answer, answer
    assert out[0, -1].item() == 2  # stopped at <|im_end|>, the generation config's EOS


def test_import_is_exact_against_transformers_own_gguf_load(smol, smollm2_gguf):
    import os

    from transformers import AutoModelForCausalLM

    _, model = smol
    ref = AutoModelForCausalLM.from_pretrained(os.path.dirname(smollm2_gguf), gguf_file=os.path.basename(smollm2_gguf),
                                               dtype=torch.float32, local_files_only=True)
    ours, theirs = model.state_dict(), ref.state_dict()
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    ids = torch.tensor([[1, 4093, 198, 1780, 314, 216, 34, 27, 34, 47, 2]])
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, ref(input_ids=ids).logits, rtol=1e-6, atol=1e-6)


def test_derived_proxy_is_the_full_models_first_layers(smol, smollm2_proxy):
    tok, full = smol
    proxy, ptok = load_model(smollm2_proxy), load_tokenizer(smollm2_proxy)
    assert proxy.config.num_hidden_layers == 2 and len(proxy.model.layers) == 2
    assert ptok.chat_template == tok.chat_template and proxy.generation_config.eos_token_id == 2
    fs, ps = full.state_dict(), proxy.state_dict()
    assert all(torch.equal(ps[k], fs[k]) for k in ps)
    ids = _chat_ids(tok, "What is 2+2?")["input_ids"]
    layers = full.model.layers
    try:
        full.model.layers = layers[:2]  # the full model's own forward over its first 2 layers, norm and head
        with torch.no_grad():
            expected = full(input_ids=ids, use_cache=False).logits
    finally:
        full.model.layers = layers
    with torch.no_grad():
        torch.testing.assert_close(proxy(input_ids=ids).logits, expected, rtol=1e-6, atol=1e-6)
        assert proxy.generate(input_ids=ids, max_new_tokens=3, do_sample=False).shape[1] > ids.shape[1]


def test_derive_proxy_refuses_bad_layer_counts_and_leaves_nothing_half_written(smollm2_proxy, tmp_path, monkeypatch):
    from pathlib import Path

    from s2l_ray import models

    for n in (0, 3):
        with pytest.raises(ModelError, match=f"{smollm2_proxy}: num_layers must be between 1 and 2.*not {n}"):
            models.derive_proxy(smollm2_proxy, str(tmp_path / "cut"), n)
    assert not (tmp_path / "cut").exists()

    def dies_halfway(model, tok, path):
        (Path(path) / "config.json").write_text("{}")
        raise KeyboardInterrupt

    monkeypatch.setattr(models, "save_model", dies_halfway)
    with pytest.raises(KeyboardInterrupt):
        models.derive_proxy(smollm2_proxy, str(tmp_path / "cut"), 1)
    assert list(tmp_path.iterdir()) == []
    monkeypatch.undo()
    one = load_model(models.derive_proxy(smollm2_proxy, str(tmp_path / "cut"), 1))
    assert one.config.num_hidden_layers == 1
    with pytest.raises(ModelError, match=f"output already exists: {tmp_path / 'cut'}"):
        models.derive_proxy(smollm2_proxy, str(tmp_path / "cut"), 1)


def _unsupported_gguf(path) -> None:
    import gguf
    import numpy as np

    w = gguf.GGUFWriter(str(path), "not_an_arch")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((4, 4), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_bad_gguf_files_are_refused_naming_the_file(smollm2_gguf, tmp_path):
    from s2l_ray.models import import_gguf

    out = tmp_path / "out"
    with pytest.raises(ModelError, match=f"GGUF file does not exist: {tmp_path / 'nope.gguf'}"):
        import_gguf(str(tmp_path / "nope.gguf"), str(out))
    text = tmp_path / "notes.gguf"
    text.write_text("just some text, renamed\n")
    with pytest.raises(ModelError, match=f"{text}: not a GGUF file"):
        import_gguf(str(text), str(out))
    truncated = tmp_path / "truncated.gguf"
    with open(smollm2_gguf, "rb") as f:
        truncated.write_bytes(f.read(1 << 20))
    with pytest.raises(ModelError, match=f"{truncated}: cannot import GGUF, truncated or corrupt"):
        import_gguf(str(truncated), str(out))
    alien = tmp_path / "alien.gguf"
    _unsupported_gguf(alien)
    with pytest.raises(ModelError, match=f"{alien}: cannot import GGUF.*architecture not_an_arch is not supported"):
        import_gguf(str(alien), str(out))
    assert not out.exists() and not [p for p in tmp_path.iterdir() if "partial" in p.name]
    (out / "x").mkdir(parents=True)
    with pytest.raises(ModelError, match=f"output already exists: {out}"):
        import_gguf(smollm2_gguf, str(out))


def test_turn_end_tokens_all_go_into_the_generation_config(smol):
    from transformers import GenerationConfig

    from s2l_ray.models import _end_token_ids

    tok, _ = smol
    assert _end_token_ids(GenerationConfig(eos_token_id=2), tok) == 2
    assert _end_token_ids(GenerationConfig(eos_token_id=0), tok) == [0, 2]
    assert _end_token_ids(GenerationConfig(), tok) == 2


def test_import_job_reports_a_bad_file_in_one_line(tmp_path):
    import os
    import subprocess
    import sys

    bad = tmp_path / "model.gguf"
    bad.write_text("not a model\n")
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, "jobs/import_model.py", "--gguf", str(bad), "--output", str(tmp_path / "m")],
                          cwd=repo, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert errors == [f"error: {bad}: not a GGUF file (no GGUF magic bytes)"], proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "m").exists()
