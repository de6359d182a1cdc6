"""Ray's token authentication: make sure a token exists before a cluster is started by hand."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path


def token_path() -> Path:
    return Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")


def read_token() -> str | None:
    """The token a client sends when RAY_AUTH_MODE=token: RAY_AUTH_TOKEN, else the token file."""
    if os.environ.get("RAY_AUTH_MODE", "token").lower() != "token":
        return None
    if token := os.environ.get("RAY_AUTH_TOKEN"):
        return token.strip()
    path = token_path()
    return path.read_text().strip() if path.exists() else None


def ensure_token() -> None:
    """With RAY_AUTH_MODE=token, a head started outside ``ray.init`` needs a token to exist.

    ``ray.init`` writes one itself; ``ray start`` and ``ray.cluster_utils.Cluster`` do not.
    ``ray get-auth-token --generate`` is Ray's own way to write it.
    """
    if os.environ.get("RAY_AUTH_MODE", "").lower() != "token":
        return
    if os.environ.get("RAY_AUTH_TOKEN") or token_path().exists():
        return
    beside = Path(sys.executable).with_name("ray")  # this environment's Ray before any other on PATH
    ray_cli = str(beside) if beside.exists() else (shutil.which("ray") or "ray")
    subprocess.run([ray_cli, "get-auth-token", "--generate"], check=True, capture_output=True)
