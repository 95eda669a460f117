"""Hugging Face Hub ids, opt-in and pinned: ``ORG/NAME[@REVISION]`` for a corpus, a model or a tokenizer.

An id is resolved through Hugging Face's own client and cache (``huggingface_hub.snapshot_download``: it honours
``HF_HUB_OFFLINE``, ``HF_HUB_CACHE``/``HF_HOME`` and revisions) into the local snapshot folder it returns, which is
then read like any local directory; the snapshot's commit hash is recorded, and since the folder's path holds it,
every stage key that names the path changes with the revision. A local path of the same name wins. No repository
code is ever run (models and tokenizers load without ``trust_remote_code``). On a cluster whose nodes share no disk,
``publish`` copies the snapshot under the run's URI, so that every node reads the same files.
"""
from __future__ import annotations

import os
import posixpath
import re

from .config import ConfigError

HUB_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(?:@(?P<revision>[\w./-]+))?$")


class HubError(ConfigError):
    """A Hub id that does not resolve (absent, offline without a cached snapshot, or an unknown revision)."""


def hub_id(value: str) -> tuple[str, str | None] | None:
    """``(repo, revision)`` when ``value`` names a Hub repository rather than a URI or an existing local path."""
    if not value or "://" in value or os.path.exists(value) or value.startswith((".", "/", "~")):
        return None
    m = HUB_ID.match(value)
    return (m["repo"], m["revision"]) if m else None


def resolve(value: str, what: str, repo_type: str = "model") -> tuple[str, dict | None]:
    """``value`` as a local path or URI (unchanged) or, for a Hub id, its snapshot folder; with the record
    ``{"id", "repo_type", "revision": commit hash}`` of a Hub id (else None). ``what`` names the setting in errors."""
    parsed = hub_id(value)
    if parsed is None:
        return value, None
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (HFValidationError, LocalEntryNotFoundError, RepositoryNotFoundError,
                                        RevisionNotFoundError)

    repo, revision = parsed
    try:
        path = snapshot_download(repo, repo_type=repo_type, revision=revision)
    except (LocalEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError, HFValidationError) as e:
        offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0", "false", "False")
        raise HubError(f"{what} {value!r} is neither a local path nor a Hub {repo_type} that resolves"
                       + (" offline (HF_HUB_OFFLINE is set and the cache holds no such snapshot)" if offline else "")
                       + f": {type(e).__name__}: {str(e).splitlines()[0]}") from None
    return path, {"id": repo, "repo_type": repo_type, "revision": os.path.basename(os.path.normpath(path))}


def from_hub(value: str, what: str, records: dict, run_uri: str, repo_type: str = "model") -> str:
    """``value``, or the snapshot of the Hub id it is (its record added to ``records`` under ``what``), published under
    the run's URI when the run lives on object storage."""
    path, record = resolve(value, what, repo_type)
    if record is None:
        return value
    records[what] = record
    return publish(path, record, run_uri)


def publish(path: str, record: dict, run_uri: str) -> str:
    """A resolved snapshot copied under ``<run>/hub/<repo>@<revision>/`` (once) when the run lives on object storage;
    returns the URI there (or ``path`` unchanged for a local run)."""
    if "://" not in run_uri:
        return path
    import pyarrow.fs as pafs

    from .layout import exists, resolve as resolve_uri

    dest = posixpath.join(run_uri, "hub", f"{record['id'].replace('/', '--')}@{record['revision']}")
    fs, root = resolve_uri(dest)
    if not exists(fs, posixpath.join(root, ".complete")):
        pafs.copy_files(os.path.realpath(path), root, destination_filesystem=fs)
        with fs.open_output_stream(posixpath.join(root, ".complete")) as f:
            f.write(record["revision"].encode())
    return dest
