"""Where a sweep's code comes from: the experiment file's repository (commit, remote) as run tags, and its docstring."""

from __future__ import annotations

import ast
import subprocess
from pathlib import Path


def _git(path: str | Path, *args: str) -> str | None:
    """The output of ``git ARGS`` run in ``path`` (None outside a repository, or without git)."""
    try:
        out = subprocess.run(["git", *args], cwd=path, capture_output=True, text=True, timeout=5, check=True)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def git_commit(path: str | Path = ".") -> str | None:
    """The commit checked out in the repository at ``path`` (None without one)."""
    return _git(path, "rev-parse", "HEAD")


def git_repo_url(path: str | Path = ".") -> str | None:
    """The URL of the ``origin`` remote of the repository at ``path`` (None without one)."""
    return _git(path, "remote", "get-url", "origin")


def source_tags(experiment_file: str, commit: str | None) -> dict[str, str]:
    """The tags of a run that name its source: the experiment file and its repository's commit, and MLflow's source
    tags (the file, run locally, at that commit and the repository's remote) that the UI shows."""
    tags = {"experiment_file": experiment_file, **({"git_commit": commit} if commit else {})}
    if not experiment_file:
        return tags
    tags.update({"mlflow.source.name": experiment_file, "mlflow.source.type": "LOCAL"})
    if commit:
        tags["mlflow.source.git.commit"] = commit
        url = git_repo_url(Path(experiment_file).parent)
        if url:
            tags["mlflow.source.git.repoURL"] = url
    return tags


def file_docstring(path: str) -> str:
    """The module docstring of a Python file ("" if it has none or cannot be read)."""
    try:
        return ast.get_docstring(ast.parse(Path(path).read_text())) or ""
    except (OSError, SyntaxError, ValueError):
        return ""
