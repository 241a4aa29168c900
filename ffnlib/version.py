"""Which code computed a result: the package version and, in a git checkout, the commit.

Every notebook summary records :func:`code_version`, and the report states it in its header, so a committed report
says which code made it.

>>> code_version()["ffnlib"]
'0.1.0'
"""

from __future__ import annotations

import subprocess
from functools import lru_cache
from pathlib import Path

__all__ = ["code_version", "describe_versions"]

ROOT = Path(__file__).resolve().parents[1]


@lru_cache(maxsize=1)
def code_version() -> dict:
    """``{"ffnlib": version, "commit": sha or None, "modified": bool or None}``: ``commit`` is the checkout's
    HEAD where the package runs from a git checkout (None for an installed copy), ``modified`` whether files it
    tracks differ from that commit."""
    from . import __version__

    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    commit = git("rev-parse", "HEAD") if (ROOT / ".git").exists() else None
    status = git("status", "--porcelain", "--untracked-files=no") if commit else None
    return {"ffnlib": __version__, "commit": commit, "modified": None if status is None else bool(status)}


def describe_versions(versions: dict[str, dict | None]) -> str:
    """One line for a report: the code of each notebook's summary, grouped (``{notebook: code_version() or
    None}``); "not recorded" for summaries written before versions were recorded."""
    groups: dict[str, list[str]] = {}
    for notebook, version in versions.items():
        if not version:
            text = "not recorded"
        else:
            commit = version.get("commit")
            text = f"ffnlib {version.get('ffnlib', '?')}" + (
                f", commit {commit[:12]}{' with local changes' if version.get('modified') else ''}" if commit
                else ", not from a git checkout")
        groups.setdefault(text, []).append(notebook.split("_")[0])
    if len(groups) == 1:
        return next(iter(groups))
    return "; ".join(f"{text} ({', '.join(names)})" for text, names in groups.items())
