"""Fill a Hugging Face hub cache on disk, without network, in huggingface_hub's documented layout.

``models--{namespace}--{name}/`` holds ``blobs/`` (file contents, named by a digest),
``snapshots/{commit}/`` (the repository's tree at a commit: symlinks into ``blobs/``) and
``refs/{branch or tag}`` (the commit the ref points at). That is what ``snapshot_download``
reads under ``HF_HUB_OFFLINE=1``, and what ``huggingface_hub.scan_cache_dir`` checks.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path


def fill_hub_cache(cache: Path, repo_id: str, src: Path, ref: str = "main") -> Path:
    """Put the files of directory ``src`` into ``cache`` as ``repo_id`` at ``ref``; return the
    snapshot directory. The commit hash is derived from the files, so two different sources
    give two snapshots."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    files = sorted(p for p in src.iterdir() if p.is_file())
    commit = hashlib.sha1(b"".join(p.name.encode() + p.read_bytes() for p in files)).hexdigest()
    snapshot = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    snapshot.mkdir(parents=True, exist_ok=True)
    for p in files:
        digest = hashlib.sha256(p.read_bytes()).hexdigest()
        blob = repo / "blobs" / digest
        if not blob.exists():
            shutil.copyfile(p, blob)
        link = snapshot / p.name
        if not link.exists():
            os.symlink(os.path.relpath(blob, snapshot), link)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / ref).write_text(commit)
    return snapshot
