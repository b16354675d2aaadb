"""The DashScope API key: where it comes from, and that an HTTP header can carry it.

A key with a line break, a space, a control or a non-ASCII character cannot be sent in
the ``Authorization`` header; HTTP libraries raise deep inside a request. It is refused
here, before anything is sent, with a message that says where the key came from and
which kind of character is wrong, and never shows the key or any part of it.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass

from .errors import ConfigError

API_KEY_ENV = "DASHSCOPE_API_KEY"
API_KEY_FILE_ENV = "DASHSCOPE_API_KEY_FILE_PATH"
MAX_KEY_FILE_BYTES = 64 * 1024  # a key is ~40 bytes; anything this large is the wrong file
KEY_PREFIX = "sk-"


@dataclass(frozen=True)
class ApiKey:
    """A key that an HTTP header can carry, and where it came from (for messages)."""

    value: str
    source: str

    def __repr__(self) -> str:
        return f"ApiKey(source={self.source!r})"  # never the value


_KEY_ENVS_READ: set[str] = set()
"""Every other variable a run read its key from (``api.key_env``): scrubbed from messages too."""


def read_api_key(key_env: str = API_KEY_ENV) -> ApiKey:
    """The key from ``key_env`` (the spec's ``api.key_env``); for the default DASHSCOPE_API_KEY,
    else from the file DASHSCOPE_API_KEY_FILE_PATH names.

    Raises ConfigError (exit 2) when there is none, the file cannot be used, or the key
    holds a character no HTTP header can carry.
    """
    if key_env != API_KEY_ENV:
        _KEY_ENVS_READ.add(key_env)
    key = os.environ.get(key_env, "").strip()
    source = key_env
    key_file = os.environ.get(API_KEY_FILE_ENV, "") if key_env == API_KEY_ENV else ""
    if not key and key_file:
        key, source = read_key_file(key_file), f"the key file named by {API_KEY_FILE_ENV}"
    if not key:
        if key_env != API_KEY_ENV:
            raise ConfigError(
                f"no API key: export {key_env}=... (the job's api.key_env names it), set api.key_env: null "
                "for a server that needs no key, or add --emulate to run against the built-in emulator"
            )
        raise ConfigError(
            f"no API key: export {API_KEY_ENV}=sk-... (or {API_KEY_FILE_ENV}=/path/to/key), "
            "or add --emulate to run against the built-in emulator"
        )
    problem = key_problem(key)
    if problem is not None:
        raise ConfigError(f"the API key in {source} {problem}; copy the key again from the DashScope console")
    return ApiKey(key, source)


def key_problem(key: str) -> str | None:
    """Why ``key`` cannot go in an HTTP header, naming the character's kind and place, never the key."""
    for place, char in enumerate(key, start=1):
        if "!" <= char <= "~":
            continue
        if char in "\r\n":
            kind = "a line break"
        elif char in " \t":
            kind = "a space or tab"
        elif char < " " or char == "\x7f":
            kind = "a control character"
        else:
            kind = "a non-ASCII character"
        return f"has {kind} at character {place} of {len(key)}, which an HTTP header cannot carry"
    return None


def read_key_file(path: str) -> str:
    """The stripped text of the key file; a missing, unreadable, odd or empty file is a ConfigError.

    Only a regular file is read (a FIFO would block forever), and at most MAX_KEY_FILE_BYTES.
    """
    if path.startswith(KEY_PREFIX) and os.sep not in path:
        raise ConfigError(
            f"{API_KEY_FILE_ENV} holds what looks like a key, not a path; "
            f"put the key in {API_KEY_ENV}, or its file's path in {API_KEY_FILE_ENV}"
        )
    where = f"{API_KEY_FILE_ENV}={path}"
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except (OSError, ValueError) as exc:
        reason = getattr(exc, "strerror", None) or str(exc)
        raise ConfigError(f"{where}: cannot open the key file ({reason}); check the path") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ConfigError(f"{where}: not a regular file; give the path of the file that holds the key")
        data = _read_at_most(fd, MAX_KEY_FILE_BYTES + 1)
    except OSError as exc:
        raise ConfigError(f"{where}: cannot read the key file ({exc.strerror}); check its permissions") from None
    finally:
        os.close(fd)
    if len(data) > MAX_KEY_FILE_BYTES:
        raise ConfigError(f"{where}: larger than {MAX_KEY_FILE_BYTES // 1024} KiB, so not a key file; check the path")
    try:
        key = data.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise ConfigError(f"{where}: the key file is not UTF-8 text; save just the key in it") from None
    if not key:
        raise ConfigError(f"{where}: the key file is empty; put the key in it")
    return key


def _read_at_most(fd: int, limit: int) -> bytes:
    chunks: list[bytes] = []
    size = 0
    while size < limit:
        chunk = os.read(fd, limit - size)
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    return b"".join(chunks)


def keys_to_scrub() -> list[str]:
    """Every key the environment holds or names, for scrubbing messages; never raises or blocks."""
    keys = [os.environ.get(name, "").strip() for name in (API_KEY_ENV, *sorted(_KEY_ENVS_READ))]
    key_file = os.environ.get(API_KEY_FILE_ENV, "")
    if key_file:
        if key_file.startswith(KEY_PREFIX) and os.sep not in key_file:
            keys.append(key_file.strip())
        try:
            keys.append(read_key_file(key_file))
        except ConfigError:
            pass
    return [key for key in keys if key]
