"""Pretrained bases for the benchmark: a proxy and a target pretrained once, shared between benchmark outputs."""
from __future__ import annotations

import json
import posixpath

from ..config import BenchmarkConfig, ConfigError, CorpusConfig, FinetuneConfig, TextConfig, to_dict
from ..layout import RunDir, resolve, stage_key, write_bytes_atomic
from ..stages import key_of, run_stage
from ..progress import log as _log


def log(msg: str) -> None:
    _log(msg, "benchmark")


def build_bases(cfg: BenchmarkConfig) -> dict:
    """The pretrained bases, once: a proxy (``bases.proxy_preset``) and a target (``bases.target_preset``)
    trained from scratch as language models of whole texts (``text.train_on_prompt``) on a broad maths
    mixture, in ``bases.output`` (default ``<output>/bases``); reused on rerun and by other outputs with the same
    settings, tokenizer (by content) and demo generators, refused when any of them differs."""
    from pyarrow.fs import FileType

    from .. import demo, finetune
    from ..corpus import normalised
    from ..models import PRESETS, load_tokenizer, preset_config

    b, out = cfg.bases, RunDir(cfg.bases.output or posixpath.join(cfg.output, "bases"))
    tokenizer, generator_args = cfg.selection.text.tokenizer, cfg.selection.demo.generator_args
    settings = {k: v for k, v in to_dict(b).items() if k != "output"}  # what the bases are made from
    digest = _file_digest(posixpath.join(tokenizer, "tokenizer.json"))
    key = stage_key(settings, digest or tokenizer, generator_args)
    if key_of(out, "bases") not in (None, key):
        raise ConfigError(f"{out.uri} holds bases pretrained with another bases config, tokenizer or demo generator "
                          f"settings ({out.read_manifest().get('bases', {}).get('config')}); use a new output or "
                          "delete that folder")
    roles = [("proxy", b.proxy_preset)] + ([("target", b.target_preset)] if b.target_preset else [])
    if any(p not in PRESETS for _, p in roles):
        raise ConfigError(f"bases: presets must be among {sorted(PRESETS)}")

    def work() -> dict:
        out.ensure()
        data = out.uri_of("pretraining.jsonl")
        if out.fs.get_file_info(out.path("pretraining.jsonl")).type == FileType.NotFound:  # kept when resumed
            held_out = {r["prompt"] for _, r in normalised(cfg.evaluate.corpus)}
            rows = [r for r in demo.pretraining_rows(b.sources, b.rows_per_source, b.seed, generator_args)
                    if r["prompt"] not in held_out]
            write_bytes_atomic(out.fs, out.path("pretraining.jsonl"),
                               "".join(json.dumps(r) + "\n" for r in rows).encode())
        text = TextConfig(template="{prompt}\n", tokenizer=tokenizer, max_length=b.max_length, train_on_prompt=True)
        runs = [FinetuneConfig(output=out.uri_of(role), preset=preset, seed=cfg.selection.proxy.seed, epochs=b.epochs,
                               lr=b.lr, micro_batch_size=b.micro_batch_size, length_window=b.length_window,
                               checkpoint_every=0,
                               workers=cfg.finetune.workers, use_gpu=cfg.finetune.use_gpu,
                               corpus=CorpusConfig(path=data), text=text)
                for role, preset in roles]
        log(f"bases: pretraining {', '.join(f'a {p!r} {r}' for r, p in roles)} on {len(b.sources)} x "
            f"{b.rows_per_source} maths texts in {out.uri}")
        records = dict(zip([r for r, _ in roles], finetune.run_many(runs, sweep_dir=out.uri_of("sweep"))))
        tok = load_tokenizer(tokenizer)
        params = {role: _parameters(preset_config(p, tok, b.max_length)) for role, p in roles}
        return {"config": to_dict(b), "generator_args": generator_args,
                **{r: rec["model"] for r, rec in records.items()}, "parameters": params,
                "target_to_proxy": params["target"] / params["proxy"] if "target" in params else None,
                "final_loss": {r: rec["final_loss"] for r, rec in records.items()},
                "compute_seconds": {r: rec["compute_seconds"] for r, rec in records.items()}}

    return run_stage(out, "bases", key, work)[0]  # recorded once both bases are trained


def _file_digest(uri: str) -> str:
    """The SHA-256 prefix of a file's bytes; "" when there is no such file."""
    import hashlib

    fs, path = resolve(uri)
    try:
        with fs.open_input_stream(path) as f:
            return hashlib.sha256(f.read()).hexdigest()[:16]
    except (FileNotFoundError, OSError):
        return ""


def _parameters(config) -> int:
    from transformers import AutoModelForCausalLM

    return sum(p.numel() for p in AutoModelForCausalLM.from_config(config).parameters())
