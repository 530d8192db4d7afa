"""Push a published folder (``W/hub``) to a Hugging Face Hub dataset repository.

The token is read from the ``HF_TOKEN`` environment variable only (never from a config,
never from the CLI, never logged or written). The repository is created when missing
(``create_repo(exist_ok=True)``, ``private`` honoured on creation). The upload is resumable:
``HfApi.upload_large_folder`` where this huggingface_hub has it (0.25 - 1.x), else
``HfApi.upload_folder``, which in huggingface_hub 2.x is itself the streamed, multi-commit,
resumable Xet pipeline; rerunning after an interruption transfers only what is missing.
With ``upload_folder``, remote ``data/`` shards that are no longer part of the local
folder are deleted in the same run, so a re-publish with fewer shards leaves no stale files.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dbr_builder.errors import UserError

# Never pushed: huggingface_hub's own resume cache and our temporary files.
IGNORE_PATTERNS = [".cache/**", "**/.*.tmp", "**/.*.parquet", ".*"]


class HubError(UserError):
    """The push could not be done (no token, bad repo id, Hub error); message says what to do."""


def files_to_upload(folder: str | Path) -> list[tuple[str, int]]:
    """(path relative to ``folder``, size in bytes) of every file a push would upload, sorted."""
    folder = Path(folder)
    out = []
    for p in sorted(folder.rglob("*")):
        rel = p.relative_to(folder).as_posix()
        if not p.is_file() or any(part.startswith(".") for part in rel.split("/")):
            continue
        out.append((rel, p.stat().st_size))
    return out


def get_token() -> str:
    """The Hub token from ``HF_TOKEN``; a clear error when it is not set."""
    token = os.environ.get("HF_TOKEN", "").strip()
    if not token:
        raise HubError("HF_TOKEN is not set: export a Hugging Face write token as HF_TOKEN to push "
                       "(it is read from the environment only), or use --dry-run to list the files")
    return token


def check_push(repo_id: str, dry_run: bool = False) -> None:
    """Fail early on a malformed repo id, or (unless ``dry_run``) a missing ``HF_TOKEN``."""
    if repo_id.count("/") != 1 or not all(repo_id.split("/")):
        raise HubError(f"--push {repo_id!r}: expected a dataset repo id like `user/domainbed-reasoning`")
    if not dry_run:
        get_token()


def push_folder(folder: str | Path, repo_id: str, private: bool = False, dry_run: bool = False,
                revision: str | None = None, log: Callable[[str], Any] = print) -> dict[str, Any]:
    """Upload ``folder`` to the dataset repo ``repo_id``; with ``dry_run`` only list the files.

    Returns ``{"repo_id", "files", "bytes", "dry_run", "url"}``.
    """
    folder = Path(folder)
    if not (folder / "README.md").exists():
        raise HubError(f"{folder}: no README.md dataset card; run `dbr publish` before pushing")
    check_push(repo_id, dry_run=True)
    files = files_to_upload(folder)
    total = sum(s for _, s in files)
    summary: dict[str, Any] = {"repo_id": repo_id, "files": len(files), "bytes": total, "dry_run": dry_run,
                               "url": f"https://huggingface.co/datasets/{repo_id}"}
    if dry_run:
        log(f"dry run: would upload {len(files)} files ({total / 1e6:.1f} MB) from {folder} to "
            f"{summary['url']}{' (private)' if private else ''}:")
        for rel, size in files:
            log(f"  {rel}  ({size} bytes)")
        return summary

    token = get_token()
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    try:
        api.create_repo(repo_id, repo_type="dataset", private=private, exist_ok=True)
        log(f"pushing {len(files)} files ({total / 1e6:.1f} MB) to {summary['url']} (resumable; rerun to resume)")
        if hasattr(api, "upload_large_folder"):
            api.upload_large_folder(repo_id=repo_id, folder_path=str(folder), repo_type="dataset",
                                    revision=revision, private=private, ignore_patterns=IGNORE_PATTERNS)
        else:
            api.upload_folder(repo_id=repo_id, folder_path=str(folder), repo_type="dataset", revision=revision,
                              commit_message="Publish DomainBed-Reasoning with dbr-builder",
                              ignore_patterns=IGNORE_PATTERNS, delete_patterns=["data/**"])
    except Exception as e:  # Hub/HTTP errors: say what failed without a deep traceback or the token
        msg = str(e).replace(token, "***")
        raise HubError(f"push to {repo_id} failed: {type(e).__name__}: {msg}") from None
    log(f"pushed to {summary['url']}")
    return summary
