"""How a fine-tuning run persists, in its output directory (a local path or a URI), the one way for
a lone run and for the runs of a sweep::

    <output>/
      corpus/              the training rows, tokenised with the target's tokenizer (corpus.store)
      train/               Ray Train storage: mid-run checkpoints (every rank's DeepSpeed shards)
      model/               the fine-tuned model (safetensors), its tokenizer and generation config
      trainer_state.json   written last, after model/: step, plan and per-step log (the run is done)
      finetune.json        the driver's record: config, data, plan, status, log, attempts

Rank 0 writes ``model/`` and then ``trainer_state.json`` through the output's pyarrow
filesystem, so a model without its state file is an unfinished export and is never taken as
done. Checkpoints are reported to Ray Train only every ``checkpoint_every`` steps, for resuming.
"""
from __future__ import annotations

import posixpath
import tempfile

import pyarrow.fs as pafs

from ..layout import RunDir, exists, read_json, write_json_atomic
from .plan import FinetuneError

RUN_NAME = "train"  # Ray Train run name under <output>: fixed, so that a rerun resumes its record
STATE_FILE = "trainer_state.json"
SUMMARY = "finetune.json"
MODEL_DIR = "model"


def read_summary(run: RunDir) -> dict | None:
    return read_json(run.fs, run.path(SUMMARY))


def write_summary(run: RunDir, summary: dict) -> None:
    write_json_atomic(run.fs, run.path(SUMMARY), summary)


def read_state(run: RunDir) -> dict | None:
    return read_json(run.fs, run.path(STATE_FILE))


def written(run: RunDir, plan: dict) -> bool:
    """Whether this run's model was exported for this ``plan`` (its state file is written after it)."""
    state = read_state(run)
    return state is not None and state.get("plan") == plan and exists(run.fs, run.path(MODEL_DIR, "config.json"))


def export(module, state_dict: dict, tokenizer, state: dict, run: RunDir) -> None:
    """Rank 0: ``module`` with ``state_dict`` as a Hugging Face directory in ``<output>/model``, then the state file."""
    if exists(run.fs, run.path(STATE_FILE)):
        run.fs.delete_file(run.path(STATE_FILE))  # from here until the end the export is unfinished
    with tempfile.TemporaryDirectory() as tmp:
        module.save_pretrained(tmp, state_dict=state_dict)
        tokenizer.save_pretrained(tmp)
        if exists(run.fs, run.path(MODEL_DIR)):
            run.fs.delete_dir(run.path(MODEL_DIR))
        run.fs.create_dir(run.path(MODEL_DIR), recursive=True)
        pafs.copy_files(tmp, run.path(MODEL_DIR), source_filesystem=pafs.LocalFileSystem(),
                        destination_filesystem=run.fs)
    write_json_atomic(run.fs, run.path(STATE_FILE), state)


def latest_checkpoint(output: str) -> dict | None:
    """The latest checkpoint Ray Train recorded for the run in ``output``: ``{"step", "path"}``, or None when it has
    recorded none; a record that cannot be read is an error naming it."""
    from ray.train import Result

    from ray.train.v2._internal.constants import CHECKPOINT_MANAGER_SNAPSHOT_FILENAME

    run = RunDir(output)
    path = run.path(RUN_NAME)
    if not exists(run.fs, posixpath.join(path, CHECKPOINT_MANAGER_SNAPSHOT_FILENAME)):
        return None  # no checkpoint recorded yet
    try:
        result = Result.from_path(path, storage_filesystem=run.fs)
    except Exception as e:  # noqa: BLE001 - whatever it is, resuming from step 0 would hide it
        raise FinetuneError(f"{run.uri_of(RUN_NAME, CHECKPOINT_MANAGER_SNAPSHOT_FILENAME)}: Ray Train's checkpoint "
                            f"record cannot be read ({type(e).__name__}: {e}); delete {run.uri_of(RUN_NAME)} to train "
                            "from step 0") from e
    if result.checkpoint is None:
        return None
    return {"step": int((result.metrics or {}).get("step", -1)), "path": result.checkpoint.path}


def model_uri(run: RunDir) -> str:
    return posixpath.join(run.uri, MODEL_DIR)
