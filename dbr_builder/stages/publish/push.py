"""Push a published folder (``W/hub``, or a trained adapter) to a Hugging Face Hub repository.

One publish is one commit: ``HfApi.create_commit`` with a ``CommitOperationAdd`` for every
local file and a ``CommitOperationDelete`` for every remote file under the folders we own
(``data/`` by default) that is no longer local. Readers of the repo therefore see the old
release or the new one, never a mix (the old push deleted first and added later). The commit
names the remote state it was planned against (``parent_commit``), so a concurrent push makes it
fail instead of deleting files it never saw. Large files are uploaded (LFS / Xet) before the
commit is created; after an interruption, rerunning the same command skips what is already
uploaded.

Options: ``revision`` (a branch; created from the default branch when missing), ``create_pr``
(open a pull request with the commit, against ``revision`` or the default branch), ``tag`` (tag the new
commit, e.g. ``v1.0``), ``gated`` (``auto``/``manual``: users must accept the card's terms).

The token comes from ``huggingface_hub.get_token()``: ``HF_TOKEN`` or the saved login of
``hf auth login``. It is never taken from a config or the command line, and never logged or
written (error messages are scrubbed of it).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from dbr_builder.errors import UserError


class HubError(UserError):
    """The push could not be done (no token, bad repo id, Hub error); message says what to do."""


URL_PREFIX = {"dataset": "https://huggingface.co/datasets/", "model": "https://huggingface.co/"}


def files_to_upload(folder: str | Path) -> list[tuple[str, int]]:
    """(path relative to ``folder``, size in bytes) of every file a push would upload, sorted.

    Hidden files and folders (our temporary files, huggingface_hub's ``.cache``) are never pushed.
    """
    folder = Path(folder)
    out = []
    for p in sorted(folder.rglob("*")):
        rel = p.relative_to(folder).as_posix()
        if not p.is_file() or any(part.startswith(".") for part in rel.split("/")):
            continue
        out.append((rel, p.stat().st_size))
    return out


def get_token(required: bool = True) -> str | None:
    """The Hub token from ``huggingface_hub.get_token()`` (``HF_TOKEN``, else the saved login)."""
    from huggingface_hub import get_token as hf_get_token

    token = (hf_get_token() or "").strip() or None
    if token is None and required:
        raise HubError("no Hugging Face token: run `hf auth login` (saved login) or export HF_TOKEN with a "
                       "write token; or use --dry-run to list the operations without pushing")
    return token


def check_repo_id(repo_id: str, flag: str = "--push", repo_type: str = "dataset") -> None:
    if repo_id.count("/") != 1 or not all(repo_id.split("/")) or any(c.isspace() for c in repo_id):
        example = "user/domainbed-reasoning" if repo_type == "dataset" else "user/rd-mldg-pacs-sketch"
        raise HubError(f"{flag} {repo_id!r}: expected a {repo_type} repo id like `{example}`")


def check_push(repo_id: str, dry_run: bool = False, create_pr: bool = False, tag: str | None = None,
               flag: str = "--push", repo_type: str = "dataset") -> None:
    """Fail early on a malformed repo id, bad option mix, or (unless ``dry_run``) no token."""
    check_repo_id(repo_id, flag, repo_type)
    if create_pr and tag:
        raise HubError("--tag and --create-pr do not go together: tag the commit once the pull request is merged")
    if not dry_run:
        get_token()


def plan_operations(local: list[tuple[str, int]], remote: list[str] | None,
                    owned: tuple[str, ...] = ("data/",)) -> dict[str, list]:
    """Additions (every local file) and deletions (remote files under ``owned`` not local, sorted)."""
    names = {rel for rel, _ in local}
    deletes = sorted(r for r in (remote or []) if r.startswith(owned) and r not in names)
    return {"add": list(local), "delete": deletes}


def _scrub(e: BaseException, token: str | None) -> str:
    msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return msg.replace(token, "***") if token else msg


def remote_state(api: Any, repo_id: str, repo_type: str, revision: str | None) -> tuple[str | None, list[str]]:
    """(head commit sha or None, files) of ``repo_id`` at ``revision``; (None, []) when either is missing."""
    from huggingface_hub.errors import RepositoryNotFoundError, RevisionNotFoundError

    try:
        info = api.repo_info(repo_id, repo_type=repo_type, revision=revision)
    except (RepositoryNotFoundError, RevisionNotFoundError):
        return None, []
    return getattr(info, "sha", None), sorted(s.rfilename for s in (getattr(info, "siblings", None) or []))


def push_folder(folder: str | Path, repo_id: str, private: bool = False, dry_run: bool = False,
                revision: str | None = None, create_pr: bool = False, tag: str | None = None,
                gated: str | None = None, repo_type: str = "dataset", owned: tuple[str, ...] = ("data/",),
                commit_message: str | None = None, require_card: bool = True,
                log: Callable[[str], Any] = print) -> dict[str, Any]:
    """Upload ``folder`` to ``repo_id`` in one commit; with ``dry_run`` only list the operations.

    Returns ``{"repo_id", "files", "bytes", "dry_run", "url", "operations", "commit", "pr_url"}``;
    ``operations`` is ``[("add", path, size) ..., ("delete", path, None) ...]``.
    """
    folder = Path(folder)
    if require_card and not (folder / "README.md").exists():
        raise HubError(f"{folder}: no README.md card; run `dbr publish` before pushing")
    check_push(repo_id, dry_run=True, create_pr=create_pr, tag=tag, repo_type=repo_type)
    files = files_to_upload(folder)
    total = sum(s for _, s in files)
    url = URL_PREFIX.get(repo_type, URL_PREFIX["model"]) + repo_id
    summary: dict[str, Any] = {"repo_id": repo_id, "files": len(files), "bytes": total, "dry_run": dry_run,
                               "url": url, "revision": revision, "create_pr": create_pr, "tag": tag,
                               "commit": None, "pr_url": None}
    token = get_token(required=not dry_run)

    from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi

    api = HfApi(token=token)
    where = f"{url}" + (f" (branch {revision})" if revision else "") + (" as a pull request" if create_pr else "")
    if dry_run:
        try:
            parent, remote = remote_state(api, repo_id, repo_type, revision)
            known = True
        except Exception as e:  # offline, or a private repo without a token: additions are still exact
            parent, remote, known = None, [], False
            log(f"dry run: cannot list the remote files ({type(e).__name__}: {_scrub(e, token)}); "
                "deletions are not shown")
        plan = plan_operations(files, remote, owned)
        ops = [("add", rel, size) for rel, size in plan["add"]] + [("delete", rel, None) for rel in plan["delete"]]
        summary["operations"] = ops
        summary["remote_known"] = known
        log(f"dry run: one commit to {where}{' (private)' if private else ''}"
            f"{f' on top of {parent[:12]}' if parent else ''}: {len(plan['add'])} additions "
            f"({total / 1e6:.1f} MB), {len(plan['delete'])} deletions{f', then tag {tag}' if tag else ''}"
            f"{f', gated={gated}' if gated else ''}:")
        for op, rel, size in ops:
            log(f"  {op:<6} {rel}" + (f"  ({size} bytes)" if size is not None else ""))
        return summary

    try:
        api.create_repo(repo_id, repo_type=repo_type, private=private, exist_ok=True)
        if revision:  # the branch to commit to (or to open the pull request against)
            api.create_branch(repo_id, branch=revision, repo_type=repo_type, exist_ok=True)
        parent, remote = remote_state(api, repo_id, repo_type, revision)
        plan = plan_operations(files, remote, owned)
        ops = ([CommitOperationAdd(path_in_repo=rel, path_or_fileobj=str(folder / rel)) for rel, _ in plan["add"]]
               + [CommitOperationDelete(path_in_repo=rel) for rel in plan["delete"]])
        summary["operations"] = ([("add", rel, size) for rel, size in plan["add"]]
                                 + [("delete", rel, None) for rel in plan["delete"]])
        log(f"pushing one commit to {where}: {len(plan['add'])} additions ({total / 1e6:.1f} MB), "
            f"{len(plan['delete'])} deletions (uploads resume if rerun)")
        info = api.create_commit(
            repo_id, ops, repo_type=repo_type, revision=revision, create_pr=create_pr, parent_commit=parent,
            commit_message=commit_message or "Publish with dbr-builder",
            commit_description=f"{len(plan['add'])} files added or updated, {len(plan['delete'])} deleted.",
        )
        summary["commit"] = getattr(info, "oid", None)
        summary["pr_url"] = getattr(info, "pr_url", None)
        if tag:
            api.create_tag(repo_id, tag=tag, revision=summary["commit"], repo_type=repo_type,
                           tag_message=commit_message or "Published with dbr-builder")
        if gated:
            api.update_repo_settings(repo_id, gated=gated, repo_type=repo_type)
    except Exception as e:  # Hub/HTTP errors: say what failed without a deep traceback or the token
        raise HubError(f"push to {repo_id} failed: {type(e).__name__}: {_scrub(e, token)}") from None
    log(f"pushed to {summary['pr_url'] or url}" + (f" (commit {summary['commit'][:12]})" if summary["commit"] else "")
        + (f", tagged {tag}" if tag else ""))
    return summary
