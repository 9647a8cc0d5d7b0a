"""Lay a folder out in an HF cache exactly as `huggingface_hub` fills it when downloading a repo, so
`from_pretrained("<user>/<name>")` (or a dataset id) can be exercised with `HF_HUB_OFFLINE=1` and no network."""

import hashlib
import os
from pathlib import Path

_CACHE_PREFIX = {"model": "models--", "dataset": "datasets--", "space": "spaces--"}


def populate_hub_cache(
    folder: str | os.PathLike, repo_id: str, cache_dir: str | os.PathLike, repo_type: str = "model"
) -> Path:
    """Copy every file of `folder` into `cache_dir` as blobs + snapshot symlinks + refs/main; return the snapshot.
    `repo_type` is "model", "dataset" or "space" (the cache folder is prefixed models--, datasets-- or spaces--)."""
    folder = Path(folder)
    repo_dir = Path(cache_dir) / (_CACHE_PREFIX[repo_type] + repo_id.replace("/", "--"))
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    commit = hashlib.sha1("".join(str(p.relative_to(folder)) for p in files).encode()).hexdigest()
    snapshot = repo_dir / "snapshots" / commit
    (repo_dir / "blobs").mkdir(parents=True, exist_ok=True)
    (repo_dir / "refs").mkdir(parents=True, exist_ok=True)
    for path in files:
        data = path.read_bytes()
        blob = repo_dir / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        link = snapshot / path.relative_to(folder)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (repo_dir / "refs" / "main").write_text(commit)
    return snapshot
