"""Load causal LMs and tokenizers from local directories, or build tiny ones from a preset.

Nothing is fetched from a model hub: every ``from_pretrained`` call gets a local directory,
remote code is never trusted unless asked for, and weights are saved as safetensors.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError

from .config import ConfigError
from transformers import (AutoConfig, AutoModelForCausalLM, AutoTokenizer, GPTNeoXConfig,
                          PreTrainedModel)

# GPT-NeoX (the Pythia architecture) sizes. "tiny" is the demo proxy, "small" a demo target
# with about 10x its parameters.
PRESETS: dict[str, dict[str, int]] = {
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256),
    "small": dict(hidden_size=192, num_hidden_layers=4, num_attention_heads=6, intermediate_size=768),
    "base": dict(hidden_size=512, num_hidden_layers=6, num_attention_heads=8, intermediate_size=2048),
}


class ModelError(ValueError):
    """A model or tokenizer directory is missing or not usable."""


def _check_dir(path: str, what: str) -> Path:
    p = Path(path)
    if not p.is_dir():
        raise ModelError(f"{what} directory does not exist: {path}")
    return p


def load_tokenizer(path: str, trust_remote_code: bool = False) -> Any:
    """A tokenizer from a local directory, with a pad token (EOS when it has none)."""
    _check_dir(path, "tokenizer")
    try:
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code, local_files_only=True)
    except (OSError, ValueError) as e:
        raise ModelError(f"{path}: not a tokenizer directory ({e})") from None
    if tok.eos_token is None:
        raise ModelError(f"{path}: tokenizer has no EOS token; set eos_token in its config")
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(path: str, dtype: torch.dtype = torch.float32, trust_remote_code: bool = False) -> PreTrainedModel:
    """A causal LM from a local directory (safetensors preferred)."""
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


def preset_config(preset: str, tokenizer: Any, max_length: int = 512) -> GPTNeoXConfig:
    """The GPT-NeoX config of a preset size for ``tokenizer``'s vocabulary."""
    if preset not in PRESETS:
        raise ModelError(f"unknown model preset {preset!r}; choose from {sorted(PRESETS)}")
    return GPTNeoXConfig(
        vocab_size=len(tokenizer),
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


def num_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def resolve_gpu(use_gpu: str) -> bool:
    """``use_gpu`` (auto, true, false) as a decision; auto means the Ray cluster has GPUs."""
    import ray

    if use_gpu not in ("auto", "true", "false"):
        raise ConfigError(f"use_gpu must be auto, true or false, not {use_gpu!r}")
    if use_gpu == "auto":
        return ray.cluster_resources().get("GPU", 0) > 0
    return use_gpu == "true"


def resolve_bf16(precision: str, use_gpu: bool) -> bool:
    """``precision`` (auto, bf16, fp32) as a decision; auto means bf16 on GPU, fp32 on CPU."""
    if precision not in ("auto", "bf16", "fp32"):
        raise ConfigError(f"precision must be auto, bf16 or fp32, not {precision!r}")
    return precision == "bf16" or (precision == "auto" and use_gpu)
