"""Ray's token authentication: make sure a token exists, readable by its owner only, before a cluster
is started.

Whoever can read the token can submit jobs that run as the cluster's owner: the token file is
written with mode 0600 in a folder of mode 0700, and a token file that others can read is named
(``token_warning``).
"""

from __future__ import annotations

import os
import secrets
import stat
from pathlib import Path

from jobs.errors import UserError


class TokenError(UserError, RuntimeError):
    """The token file cannot be written or read; the message says which file and why."""


def token_path() -> Path:
    return Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")


def read_token() -> str | None:
    """The token a client sends when RAY_AUTH_MODE=token: RAY_AUTH_TOKEN, else the token file."""
    if os.environ.get("RAY_AUTH_MODE", "token").lower() != "token":
        return None
    if token := os.environ.get("RAY_AUTH_TOKEN"):
        return token.strip()
    path = token_path()
    try:
        return path.read_text().strip() if path.exists() else None
    except (OSError, UnicodeDecodeError) as e:
        raise TokenError(f"Ray's token file {path} cannot be read ({getattr(e, 'strerror', None) or e}); check "
                         "its permissions, or set RAY_AUTH_TOKEN_PATH to another file") from None


def ensure_token() -> None:
    """With RAY_AUTH_MODE=token, a head needs a token to exist. ``ray.init`` and ``ray get-auth-token
    --generate`` would write one readable by every user (and only to ``~/.ray/auth_token``); this
    writes the same kind of token (256 random bits, hex, as Ray's generator) where RAY_AUTH_TOKEN_PATH
    says, mode 0600, before Ray looks for one."""
    if os.environ.get("RAY_AUTH_MODE", "").lower() != "token" or os.environ.get("RAY_AUTH_TOKEN"):
        return
    path = token_path()
    if path.exists():
        return
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:  # another process wrote it a moment ago
        return
    except OSError as e:
        raise TokenError(f"Ray's token file {path} cannot be created ({e.strerror or e}); set "
                         "RAY_AUTH_TOKEN_PATH to a file in a folder you can write") from None
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32))


def token_warning() -> str | None:
    """One line when the token file can be read by users other than its owner, else None."""
    if os.environ.get("RAY_AUTH_MODE", "token").lower() != "token" or os.environ.get("RAY_AUTH_TOKEN"):
        return None
    path = token_path()
    try:
        mode = path.stat().st_mode
    except OSError:
        return None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        return (f"Ray's token file {path} can be read by other users (mode {stat.S_IMODE(mode):04o}), who could then "
                f"run jobs as you on the cluster; `chmod 600 {path}`")
    return None
