"""What a fine-tuning run trains on: the selection a run directory names, the target model and its
tokenizer, and the rows stored (tokenised with the target's tokenizer) in the run's output."""
from __future__ import annotations

import posixpath
from dataclasses import replace
from pathlib import Path

from ..config import DemoConfig, FinetuneConfig
from ..layout import RunDir, absolute, exists, resolve
from ..progress import log
from .plan import FinetuneError


def demo_paths() -> dict[str, str]:
    """The demo corpus under ``demo.DEMO_ROOT``: reused as it is when present, else built with defaults."""
    from .. import demo

    root = Path(demo.DEMO_ROOT)
    if (root / "demo.json").is_file():
        return {"train": str(root / "train.jsonl"), "eval": str(root / "eval.jsonl"),
                "tokenizer": str(root / "tokenizer")}
    log(f"building the demo corpus and tokenizer in {root}", "finetune")
    return demo.build(DemoConfig(), str(root))


def resolve_data(cfg: FinetuneConfig) -> str:
    """The training data: the selection a run directory's manifest names, or ``corpus.path`` itself.

    In a selection run directory the file is the one its last selection wrote for ``budget``
    (required when it wrote several), never guessed from the files present.
    """
    path = cfg.corpus.path
    if not path:
        raise FinetuneError("no training data: pass --data (a selection run dir or a corpus path)")
    fs, root = resolve(path)
    info = fs.get_file_info(root)
    if info.type.name == "NotFound":
        raise FinetuneError(f"training data not found: {path} (run jobs/select.py first, or pass --data)")
    if info.type.name != "Directory":
        if cfg.budget:
            raise FinetuneError(f"budget={cfg.budget} picks a selection inside a run directory; {path} is a file")
        return path
    run = RunDir(path)
    if not exists(fs, run.manifest):
        if cfg.budget:
            raise FinetuneError(f"budget={cfg.budget} picks a selection inside a run directory; {path} has no "
                                "manifest.json")
        return path  # a folder of corpus shards
    budgets = list((run.read_manifest().get("selection") or {}).get("budgets", {}))
    if not budgets:
        raise FinetuneError(f"{path} is a selection run whose selection has not finished (no selection in its "
                            "manifest.json): rerun jobs/select.py")
    if cfg.budget and str(cfg.budget) not in budgets:
        raise FinetuneError(f"{path} has no selection of budget {cfg.budget} (its selection: {', '.join(budgets)})")
    if not cfg.budget and len(budgets) > 1:
        raise FinetuneError(f"{path} holds selections of budgets {', '.join(budgets)}; choose one with --budget")
    chosen = run.selected_jsonl(cfg.budget if len(budgets) > 1 else None)
    if not exists(fs, chosen):
        raise FinetuneError(f"{chosen} is missing although {run.manifest} records it")
    return run.uri_of(posixpath.basename(chosen))



def resolve_model(cfg: FinetuneConfig) -> FinetuneConfig:
    """``cfg`` with absolute local (or URI) model and tokenizer dirs, both checked.

    The tokenizer is ``text.tokenizer``, else the model's. Without a model, a fresh ``preset``
    model is trained from scratch: for the demo (its tokenizer) or with a tokenizer given; a
    selection of the user's own corpus needs ``--model`` (the target), and is refused without.
    """
    from ..hub import from_hub
    from ..models import load_tokenizer

    hub: dict[str, dict] = {}
    cfg = replace(cfg, model=from_hub(cfg.model, "model", hub, cfg.output),
                  text=replace(cfg.text, tokenizer=from_hub(cfg.text.tokenizer, "text.tokenizer", hub, cfg.output)))
    if cfg.model:
        fs, root = resolve(cfg.model)
        if not exists(fs, posixpath.join(root, "config.json")):
            raise FinetuneError(f"model directory {cfg.model} has no config.json (not a Hugging Face model dir)")
    if not cfg.model and not cfg.text.tokenizer:
        path = cfg.corpus.path
        fs, root = resolve(path)
        is_demo_run = fs.get_file_info(root).type.name == "Directory" and RunDir(path).read_manifest().get("demo")
        if path != demo_paths()["train"] and not is_demo_run:
            raise FinetuneError(f"{path} was selected from your own corpus: pass --model with the target model to "
                                "fine-tune (a Hugging Face model dir); without one, only the built-in demo trains a "
                                f"fresh {cfg.preset!r} model")
    tokenizer = absolute(cfg.text.tokenizer or cfg.model or demo_paths()["tokenizer"])
    load_tokenizer(tokenizer)
    return replace(cfg, model=absolute(cfg.model), text=replace(cfg.text, tokenizer=tokenizer))


def store_rows(cfg: FinetuneConfig, data: str, run: RunDir) -> dict:
    """The training rows tokenised with the target's tokenizer into ``<output>/corpus/`` (``corpus.store``:
    rows with no response token left are dropped and counted); returns its statistics."""
    from ..corpus import drop_summary, store

    stats = store(run, replace(cfg.corpus, path=data), cfg.text, cfg.text.tokenizer,
                  part_rows=cfg.corpus.part_rows, piece_bytes=int(cfg.corpus.piece_mb * 2**20))
    if dropped := drop_summary(stats):
        log(f"dropped {sum(stats['dropped'].values())} rows: {dropped}", "finetune")
    return stats
