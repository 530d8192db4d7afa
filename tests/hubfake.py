"""A fake Hugging Face Hub for the push tests: ``HfApi``'s methods replaced at the huggingface_hub boundary."""

from __future__ import annotations

from types import SimpleNamespace

import pytest


class FakeHub:
    """The Hub boundary: ``HfApi``'s methods replaced (the Hub is unreachable here).

    ``create_commit`` is the one that would write; the others read the remote state
    (``repo_info``) or set up the repo (``create_repo``, ``create_branch``, ``create_tag``,
    ``update_repo_settings``). Every call is recorded with its arguments.
    """

    def __init__(self, monkeypatch, remote: list[str] | None = None, sha: str = "a" * 40):
        import huggingface_hub

        self.calls: list[tuple[str, tuple, dict]] = []
        self.remote = remote or []
        fake = self

        def record(name, result=None):
            def method(api, *a, **kw):
                fake.calls.append((name, a, kw))
                return result(*a, **kw) if callable(result) else result
            return method

        def info(*a, **kw):
            return SimpleNamespace(sha=sha, siblings=[SimpleNamespace(rfilename=f) for f in fake.remote])

        def init(api, token=None, **kw):
            fake.calls.append(("init", (), {"token": token}))

        monkeypatch.setattr(huggingface_hub.HfApi, "__init__", init)
        monkeypatch.setattr(huggingface_hub.HfApi, "repo_info", record("repo_info", info))
        for name in ("create_repo", "create_branch", "create_tag", "update_repo_settings"):
            monkeypatch.setattr(huggingface_hub.HfApi, name, record(name))
        monkeypatch.setattr(huggingface_hub.HfApi, "create_commit", record(
            "create_commit", lambda *a, **kw: SimpleNamespace(oid="c" * 40, pr_url=(
                "https://huggingface.co/datasets/me/dbr/discussions/1" if kw.get("create_pr") else None))))
        for name in ("upload_folder", "upload_large_folder", "upload_file", "delete_file", "delete_folder"):
            monkeypatch.setattr(huggingface_hub.HfApi, name, lambda *a, _n=name, **kw: pytest.fail(f"{_n} called"),
                                raising=False)

    def named(self, name: str) -> list[tuple[tuple, dict]]:
        return [(a, kw) for n, a, kw in self.calls if n == name]


@pytest.fixture(name="no_saved_login")
def no_saved_login_fixture(tmp_path, monkeypatch):
    """No token anywhere: HF_TOKEN unset and the saved-login file absent."""
    import huggingface_hub.constants

    for var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    return tmp_path / "no-token"
