"""Load causal LMs and tokenizers from local directories, or build tiny ones from a preset.

Nothing is fetched from a model hub: every ``from_pretrained`` call gets a local directory,
remote code is never trusted unless asked for, and weights are saved as safetensors.
``import_gguf`` turns a GGUF file (llama.cpp's format) into such a directory, and
``derive_proxy`` cuts a model to its first layers.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError

from .config import ConfigError
from transformers import (AutoConfig, AutoModelForCausalLM, AutoTokenizer, GPTNeoXConfig,
                          PreTrainedModel)

# GPT-NeoX (the Pythia architecture) sizes. "tiny" is the demo proxy, "small" a demo target
# with about 10x its parameters; "pythia-70m" and "pythia-160m" are those models' shapes (with
# their 50,304-token vocabulary when built for a benchmark; ``preset_config(vocab_size=...)``).
PRESETS: dict[str, dict[str, int]] = {
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256),
    "small": dict(hidden_size=192, num_hidden_layers=4, num_attention_heads=6, intermediate_size=768),
    "medium": dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=8, intermediate_size=1024),
    "base": dict(hidden_size=512, num_hidden_layers=6, num_attention_heads=8, intermediate_size=2048),
    "pythia-70m": dict(hidden_size=512, num_hidden_layers=6, num_attention_heads=8, intermediate_size=2048),
    "pythia-160m": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072),
}


class ModelError(ValueError):
    """A model or tokenizer directory is missing or not usable."""


def local_dir(uri: str, what: str = "model") -> str:
    """A local directory holding ``uri``: the path itself, or for a URI (``s3://...``) a copy fetched once
    into this machine's cache (``$S2L_CACHE``, default ``~/.cache/s2l-ray/fetched``), keyed by the
    URI and the names, sizes and times of its files, so a changed directory is fetched again."""
    if "://" not in uri:
        return uri
    import hashlib

    import pyarrow.fs as pafs

    from .layout import resolve

    fs, root = resolve(uri)
    files = [i for i in fs.get_file_info(pafs.FileSelector(root, recursive=True, allow_not_found=True))
             if i.type == pafs.FileType.File]
    if not files:
        raise ModelError(f"{what} directory does not exist or is empty: {uri}")
    key = hashlib.sha256("\n".join([uri] + [f"{i.path}:{i.size}:{i.mtime_ns}" for i in sorted(
        files, key=lambda i: i.path)]).encode()).hexdigest()[:24]
    cache = Path(os.path.expanduser(os.environ.get("S2L_CACHE") or "~/.cache/s2l-ray/fetched"))
    dest = cache / key
    if not dest.is_dir():
        cache.mkdir(parents=True, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=f".{key}.", dir=cache)
        try:
            pafs.copy_files(root, tmp, source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
            os.rename(tmp, dest)  # another process may have won the race: then its copy is used
        except OSError:
            if not dest.is_dir():
                raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return str(dest)


def _check_dir(path: str, what: str) -> Path:
    p = Path(path)
    if not p.is_dir():
        raise ModelError(f"{what} directory does not exist: {path}")
    return p


def load_tokenizer(path: str, trust_remote_code: bool = False) -> Any:
    """A tokenizer from a local directory or a URI (fetched once, ``local_dir``), with a pad token (EOS when
    it has none)."""
    source, path = path, local_dir(path, "tokenizer")
    _check_dir(path, "tokenizer")
    try:
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code, local_files_only=True)
    except (OSError, ValueError) as e:
        raise ModelError(f"{source}: not a tokenizer directory ({e})") from None
    if tok.eos_token is None:
        raise ModelError(f"{source}: tokenizer has no EOS token; set eos_token in its config")
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    if getattr(tok, "is_fast", False):  # sequences are cut by this project (text.max_length), never by the tokenizer
        tok.backend_tokenizer.no_truncation()
        tok.backend_tokenizer.no_padding()
    return tok


def load_model(path: str, dtype: torch.dtype = torch.float32, trust_remote_code: bool = False) -> PreTrainedModel:
    """A causal LM from a local directory or a URI (fetched once, ``local_dir``); safetensors preferred."""
    path = local_dir(path, "model")
    p = _check_dir(path, "model")
    if not (p / "config.json").is_file():
        raise ModelError(f"{path}: no config.json, not a Hugging Face model directory")
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code, local_files_only=True)
    except (OSError, ValueError) as e:
        raise ModelError(f"{path}: unreadable model config ({e})") from None
    if type(config) not in AutoModelForCausalLM._model_mapping and not trust_remote_code:
        raise ModelError(f"{path}: model type {config.model_type!r} is not a causal language model")
    try:
        return AutoModelForCausalLM.from_pretrained(
            path, dtype=dtype, trust_remote_code=trust_remote_code, local_files_only=True,
            use_safetensors=any(p.glob("*.safetensors")) or None)
    except (OSError, ValueError, SafetensorError) as e:
        raise ModelError(f"{path}: cannot load weights ({e})") from None


def preset_config(preset: str, tokenizer: Any, max_length: int = 512, vocab_size: int = 0) -> GPTNeoXConfig:
    """The GPT-NeoX config of a preset size for ``tokenizer``'s vocabulary (or ``vocab_size`` rows, at least it)."""
    if preset not in PRESETS:
        raise ModelError(f"unknown model preset {preset!r}; choose from {sorted(PRESETS)}")
    return GPTNeoXConfig(
        vocab_size=max(vocab_size, len(tokenizer)),
        max_position_embeddings=max(max_length, 128),
        bos_token_id=tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        **PRESETS[preset],
    )


def build_model(preset: str, tokenizer: Any, seed: int = 0, max_length: int = 512) -> PreTrainedModel:
    """A freshly initialised GPT-NeoX causal LM of the given preset size."""
    config = preset_config(preset, tokenizer, max_length)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config)


def save_model(model: PreTrainedModel, tokenizer: Any, path: str) -> str:
    """Save weights (safetensors) and tokenizer side by side; returns ``path``."""
    os.makedirs(path, exist_ok=True)
    model.save_pretrained(path, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
    return path


def own_checkpoints(paths: list[str], holding: str = "config.json", setting: str = "proxy.checkpoints",
                    files: bool = False) -> list[tuple[int, str]]:
    """``(step, path)`` of each of the user's checkpoints, in step order: a directory holding ``holding`` (a model's
    ``config.json``) as it is (its step from a ``checkpoint-N`` name, else its place in the list), or a training
    output's ``checkpoint-N`` folders that hold it (Hugging Face's Trainer, TRL, axolotl, LLaMA-Factory) by N; with
    ``files``, also a file whose name ends with ``holding`` (its step from its folder's name, else its place)."""
    import posixpath
    import re

    import pyarrow.fs as pafs

    from .layout import exists, resolve

    def step(path: str) -> int:
        m = re.fullmatch(r"checkpoint-(\d+)", posixpath.basename(path.rstrip("/")))
        return int(m[1]) if m else len(out)

    out: list[tuple[int, str]] = []
    for p in paths:
        fs, root = resolve(p)
        if files and root.endswith(holding) and fs.get_file_info(root).type == pafs.FileType.File:
            out.append((step(posixpath.dirname(root)), p))
            continue
        if exists(fs, posixpath.join(root, holding)):
            out.append((step(root), p))
            continue
        found = sorted((int(m[1]), posixpath.join(p, i.base_name))
                       for i in (fs.get_file_info(pafs.FileSelector(root)) if exists(fs, root) else [])
                       if i.type == pafs.FileType.Directory and (m := re.fullmatch(r"checkpoint-(\d+)", i.base_name))
                       and exists(fs, posixpath.join(i.path, holding)))
        if not found:
            kind = "a model directory (config.json)" if holding == "config.json" else f"{holding} or a folder holding it"
            raise ConfigError(f"{setting}: {p} is neither {kind} nor a training output holding checkpoint-N folders"
                              + ("" if holding == "config.json" else f" with {holding}"))
        out += found
    steps = [s for s, _ in out]
    if steps != sorted(set(steps)):
        raise ConfigError(f"{setting}: steps {steps} are not increasing; give the checkpoints in training order")
    return out


def num_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def resolve_gpu(use_gpu: str, name: str = "use_gpu") -> bool:
    """``use_gpu`` (auto, true, false) as a decision; auto means the Ray cluster has GPUs. Before any worker node
    has joined an autoscaling cluster that is unknown, and auto is refused rather than taken as CPU."""
    import ray

    from .nodes import awaiting_workers

    if use_gpu not in ("auto", "true", "false"):
        raise ConfigError(f"{name} must be auto, true or false, not {use_gpu!r}")
    if use_gpu == "auto":
        if ray.cluster_resources().get("GPU", 0) > 0:
            return True
        if awaiting_workers():
            raise ConfigError(f"{name}=auto: no worker node has joined this cluster yet, so whether its nodes have "
                              f"GPUs is unknown; set {name} to true or false")
        return False
    return use_gpu == "true"


# Ray's accelerator types of NVIDIA GPUs below compute capability 8.0, where bf16 is emulated or missing.
NO_NATIVE_BF16 = ("V100", "P100", "T4", "P4", "K80")


def native_bf16(resources: dict | None = None) -> bool:
    """Whether the GPUs do bf16 natively (compute capability 8.0 or more): this process's GPUs when it has any,
    else every GPU type the Ray cluster reports (``resources``, default ``ray.cluster_resources()``); with none
    reported (Ray not started, or an autoscaling cluster before its GPU nodes join) they are taken to."""
    import ray

    if resources is None and torch.cuda.is_available():
        return all(torch.cuda.get_device_capability(i) >= (8, 0) for i in range(torch.cuda.device_count()))
    if resources is None:
        resources = ray.cluster_resources() if ray.is_initialized() else {}
    types = {k.split(":", 1)[1] for k in resources if k.startswith("accelerator_type:")}
    return not types & set(NO_NATIVE_BF16)


def resolve_bf16(precision: str, use_gpu: bool) -> bool:
    """``precision`` (auto, bf16, fp32) as a decision; auto means bf16 on GPUs that do it natively (A100, L4, H100:
    compute capability 8.0+), fp32 on older GPUs (T4, V100) and on CPU."""
    if precision not in ("auto", "bf16", "fp32"):
        raise ConfigError(f"precision must be auto, bf16 or fp32, not {precision!r}")
    return precision == "bf16" or (precision == "auto" and use_gpu and native_bf16())


# Special tokens that end an assistant turn in common chat templates (ChatML, Llama 3, Gemma, Phi).
TURN_END_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<end_of_turn>", "<|end|>")


def check_new_dir(output: str) -> Path:
    """``output`` as a path that a model can be written to: absent or an empty directory."""
    out = Path(output)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ModelError(f"output already exists: {output}; remove it or choose another path")
    return out


@contextmanager
def _atomic_dir(output: str):
    """A temporary sibling of ``output`` to write into, renamed to ``output`` only on success."""
    out = check_new_dir(output)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp's 0700 would hide the model from other users
    try:
        yield tmp
        if out.is_dir():
            out.rmdir()  # empty (checked above); rename needs it gone or empty
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _end_token_ids(generation_config: Any, tokenizer: Any) -> int | list[int]:
    """Every id that ends a turn: the generation config's, the tokenizer's EOS, known turn-end tokens."""
    ids = generation_config.eos_token_id
    ids = [] if ids is None else [ids] if isinstance(ids, int) else list(ids)
    specials = tokenizer.get_added_vocab()
    for tid in [tokenizer.eos_token_id] + [specials.get(t) for t in TURN_END_TOKENS]:
        if tid is not None and tid not in ids:
            ids.append(tid)
    return ids[0] if len(ids) == 1 else ids


def import_gguf(gguf_path: str, output: str, dtype: torch.dtype = torch.float32) -> str:
    """Convert a GGUF file into a plain HF model directory (safetensors, tokenizer, generation config).

    Quantized weights are dequantized to ``dtype``. The directory appears only when complete.
    """
    p = Path(gguf_path)
    if not p.is_file():
        raise ModelError(f"GGUF file does not exist: {gguf_path}")
    with open(p, "rb") as f:
        if f.read(4) != b"GGUF":
            raise ModelError(f"{gguf_path}: not a GGUF file (no GGUF magic bytes)")
    check_new_dir(output)
    d, name = str(p.resolve().parent), p.name
    try:
        tok = AutoTokenizer.from_pretrained(d, gguf_file=name, local_files_only=True)
        gguf_model = AutoModelForCausalLM.from_pretrained(d, gguf_file=name, dtype=dtype, local_files_only=True)
    except Exception as e:  # noqa: BLE001 - the GGUF loader raises many kinds for unsupported or corrupt files
        raise ModelError(f"{gguf_path}: cannot import GGUF, truncated or corrupt file or an architecture "
                         f"transformers cannot load ({type(e).__name__}: {e})") from None
    if tok.eos_token is None:
        raise ModelError(f"{gguf_path}: its tokenizer has no EOS token")
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.load_state_dict(gguf_model.state_dict(), strict=True)
    model.generation_config = gguf_model.generation_config
    model.generation_config._from_model_config = False  # ours now: loaded as saved, not rebuilt from config.json
    model.generation_config.eos_token_id = _end_token_ids(model.generation_config, tok)
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    del gguf_model
    with _atomic_dir(output) as tmp:
        save_model(model, tok, tmp)
    return output


def derive_proxy(model_dir: str, output: str, num_layers: int) -> str:
    """The model of ``model_dir`` cut to its first ``num_layers`` decoder layers, saved with its tokenizer.

    Embeddings, the final norm and the LM head are kept; a fast stand-in with real pretrained weights.
    """
    check_new_dir(output)
    model, tok = load_model(model_dir), load_tokenizer(model_dir)
    total = model.config.num_hidden_layers
    if not 1 <= num_layers <= total:
        raise ModelError(f"{model_dir}: num_layers must be between 1 and {total} (the model's), not {num_layers}")
    config = model.config.to_dict()
    config["num_hidden_layers"] = num_layers
    for key in ("layer_types",):  # per-layer lists (sliding/full attention) follow the cut
        if isinstance(config.get(key), list):
            config[key] = config[key][:num_layers]
    config = type(model.config).from_dict(config)
    cut = AutoModelForCausalLM.from_config(config, dtype=model.dtype)
    full = model.state_dict()
    kept = cut.state_dict()
    missing = [k for k, v in kept.items() if k not in full or full[k].shape != v.shape]
    if missing:
        raise ModelError(f"{model_dir}: cannot cut this model by layers (no matching weights for {missing[:3]})")
    cut.load_state_dict({k: full[k] for k in kept}, strict=True)
    cut.generation_config = model.generation_config
    with _atomic_dir(output) as tmp:
        save_model(cut, tok, tmp)
    return output
