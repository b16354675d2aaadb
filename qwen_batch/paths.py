"""Where a job reads and writes, resolved and checked once, before anything is sent.

Two promises rest on this module:

* **Nothing of the user's is overwritten.** ``job_paths`` resolves every path a job writes
  (the output Parquet, its ``.summary.json`` and ``.manifest.json``, its ``.checkpoint/`` folder, the response cache)
  through ``~`` and symbolic links, and refuses the set when one of them is, holds, or
  shares a file with the job file, the input, or another of them, or is an existing folder
  (for a file) or file (for the checkpoint folder).
* **Nothing hangs on input.** Only regular files are read: ``check_regular_file`` stats
  before opening, so a FIFO, a device or a socket is refused at once instead of blocking
  ``open``, and a symbolic link loop is named instead of failing deep inside a library.

A path that ends in ``/`` names a folder: for ``output.path`` / ``--output`` and
``cache.path`` the default file name goes inside it; the input and the job file must be files.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from .errors import ConfigError, UsageError


class _Input(Protocol):
    @property
    def path(self) -> Path: ...


class _Output(Protocol):
    @property
    def path(self) -> Path | None: ...


class _Job(Protocol):
    """What ``job_paths`` reads of a JobSpec: named here, as spec imports paths, not the reverse."""

    @property
    def path(self) -> Path | None: ...
    @property
    def where(self) -> str: ...
    @property
    def name(self) -> str | None: ...
    @property
    def input(self) -> _Input: ...
    @property
    def output(self) -> _Output: ...

SPEC_MAX_BYTES = 10 * 1024 * 1024  # a job spec is a page of YAML; anything larger is a mistake
OUTPUT_SUFFIX = ".parquet"
CHECKPOINT_SUFFIX = ".checkpoint"
SUMMARY_SUFFIX = ".summary.json"
MANIFEST_SUFFIX = ".manifest.json"  # the run record (manifest.py)
CACHE_COMPANIONS = ("-wal", "-shm", "-journal")  # files SQLite writes next to the cache

_SPECIAL_KINDS = (
    (stat.S_ISFIFO, "a FIFO (named pipe)"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)


def names_folder(text: str | os.PathLike[str]) -> bool:
    """True for a path written with a trailing ``/``: the user means a folder, never a file."""
    raw = os.fspath(text)
    return raw.endswith("/") or raw.endswith(os.sep)


def expanded(text: str | os.PathLike[str]) -> Path:
    """``text`` with ``~`` / ``~user`` expanded, as a shell would, so no folder is named ``~``."""
    return Path(os.path.expanduser(os.fspath(text)))


def resolved(path: Path, what: str, error: type[UsageError] = ConfigError) -> Path:
    """The absolute path with every symbolic link followed; a link loop is ``error`` naming it."""
    if "\0" in str(path):
        raise error(f"{str(path)!r}: {what} contains a NUL character; fix the path")
    try:
        return path.resolve()
    except (RuntimeError, OSError) as exc:  # 3.11 raises RuntimeError for a loop, later versions OSError
        if isinstance(exc, OSError) and exc.errno != errno.ELOOP:
            raise error(f"{path}: {what}: cannot resolve the path ({exc.strerror or exc}); check it") from None
        raise error(f"{path}: {what} is a symbolic link loop (or goes through one); fix or remove the link") from None


def check_regular_file(path: Path, role: str, key: str, error: type[UsageError] = ConfigError) -> os.stat_result:
    """Refuse anything but a readable regular file, with one line naming ``path`` and the fix.

    ``role`` says what the file is for ("input file", "job file"); ``key`` where it is set.
    Stats before opening, so a FIFO or a device never blocks; then opens without blocking
    and stats the open file, so a file swapped in between is caught too.
    """
    if "\0" in str(path):
        raise error(f"{str(path)!r}: the {role} path contains a NUL character; check {key}")
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise error(f"{path}: {role} not found; check {key}") from None
    except OSError as exc:
        raise error(_open_problem(path, role, exc)) from None
    _check_kind(path, info, role, key, error)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        raise error(_open_problem(path, role, exc)) from None
    try:
        info = os.fstat(fd)
    finally:
        os.close(fd)
    _check_kind(path, info, role, key, error)
    return info


def read_bounded(path: Path, role: str, key: str, max_bytes: int, error: type[UsageError] = ConfigError) -> bytes:
    """The bytes of a regular file of at most ``max_bytes``; a larger one is refused unread."""
    info = check_regular_file(path, role, key, error)
    if info.st_size > max_bytes:
        raise error(
            f"{path}: the {role} is {info.st_size:,} bytes, more than the {max_bytes:,} allowed; "
            f"check that {key} names the right file"
        )
    try:
        with path.open("rb") as handle:
            data = handle.read(max_bytes + 1)  # the file may have grown since the stat
    except OSError as exc:
        raise error(_open_problem(path, role, exc)) from None
    if len(data) > max_bytes:
        raise error(f"{path}: the {role} is more than the {max_bytes:,} bytes allowed; check that {key} names the right file")
    return data


def _check_kind(path: Path, info: os.stat_result, role: str, key: str, error: type[UsageError]) -> None:
    mode = info.st_mode
    if stat.S_ISREG(mode):
        return
    if stat.S_ISDIR(mode):
        raise error(f"{path}: is a folder; {key} must name one file")
    kind = next((name for test, name in _SPECIAL_KINDS if test(mode)), "not a regular file")
    raise error(f"{path}: is {kind}, not a regular file; {key} must name a regular file (pipes and devices are not read)")


def _open_problem(path: Path, role: str, exc: OSError) -> str:
    if exc.errno == errno.ELOOP:
        return f"{path}: the {role} path is a symbolic link loop (or goes through one); fix or remove the link"
    if isinstance(exc, PermissionError):
        return f"{path}: permission denied; make the file readable for this user"
    return f"{path}: cannot read the {role} ({exc.strerror or exc}); check the file"


# --- the set of paths a job reads and writes ---------------------------------------------


@dataclass(frozen=True)
class JobPaths:
    """A job's files, absolute and checked: read (job, input) and written (the rest)."""

    job: Path | None
    input: Path
    output: Path
    cache: Path | None

    @property
    def checkpoint(self) -> Path:
        return self.output.with_name(self.output.name + CHECKPOINT_SUFFIX)

    @property
    def summary(self) -> Path:
        return self.output.with_name(self.output.name + SUMMARY_SUFFIX)

    @property
    def manifest(self) -> Path:
        return self.output.with_name(self.output.name + MANIFEST_SUFFIX)


@dataclass(frozen=True)
class _Place:
    label: str  # how a message names it: "output.path", "--output", "the checkpoint folder"
    path: Path  # as given (absolute)
    real: Path  # every link followed
    folder: bool  # written as a folder (the checkpoint), else a file


def output_override(text: str | os.PathLike[str], name: str, error: type[UsageError] = ConfigError) -> Path:
    """``--output``'s value resolved as the spec's ``output.path`` is: ``~`` expanded, links
    followed, and a trailing ``/`` meaning ``<name>.parquet`` inside that folder."""
    path = expanded(text)
    if names_folder(text):
        path = path / f"{name}{OUTPUT_SUFFIX}"
    return resolved(path, f"--output {os.fspath(text)}", error)


def job_paths(
    spec: _Job,
    output: str | os.PathLike[str] | None = None,
    *,
    cache: Path | None = None,
    cache_label: str = "cache.path",
    error: type[UsageError] = ConfigError,
) -> JobPaths:
    """Resolve and check every path the job reads or writes; raises ``error`` before anything is sent.

    ``output`` (from ``--output``) overrides the spec's ``output.path``; ``cache`` is the
    response cache the run will open (None when the cache is off).
    """
    output_label = f"--output {os.fspath(output)}" if output is not None else "output.path"
    where = f"{spec.where}: " if output is None else ""
    out = output_override(output, spec.name or "output", error) if output is not None else spec.output.path
    if out is None:  # only a spec built in code lacks it: load_spec fills the default
        raise error(f"{where}output.path is not set; give output.path or --output")
    paths = JobPaths(job=spec.path, input=spec.input.path, output=out, cache=cache)
    read = [_place("the job file", paths.job, error)] if paths.job is not None else []
    read.append(_place("the input file", paths.input, error))
    written = [
        _place(output_label, paths.output, error),
        _place(f"the summary file {paths.summary.name} of {output_label}", paths.summary, error),
        _place(f"the run manifest {paths.manifest.name} of {output_label}", paths.manifest, error),
        _place(f"the checkpoint folder {paths.checkpoint.name} of {output_label}", paths.checkpoint, error, folder=True),
    ]
    if cache is not None:
        written.append(_place(cache_label, cache, error))
        for suffix in CACHE_COMPANIONS:
            companion = cache.with_name(cache.name + suffix)
            written.append(_place(f"the file {companion.name} of {cache_label}", companion, error))
    problem = _aliasing(read, written) or _wrong_kind(written)
    if problem:
        raise error(where + problem)
    _check_writable_folder(paths.output, output_label, where, error)
    return paths


def _place(label: str, path: Path, error: type[UsageError], *, folder: bool = False) -> _Place:
    return _Place(label, path, resolved(path, label, error), folder)


def _inode(path: Path) -> tuple[int, int] | None:
    try:
        info = os.stat(path)
    except OSError:
        return None
    return info.st_dev, info.st_ino


def _same(a: _Place, b: _Place) -> bool:
    if a.real == b.real:
        return True
    inode = _inode(a.real)
    return inode is not None and inode == _inode(b.real)  # hard links: one file under two names


def _inside(inner: _Place, folder: _Place) -> bool:
    return folder.folder and inner.real.is_relative_to(folder.real) and inner.real != folder.real


def _aliasing(read: list[_Place], written: list[_Place]) -> str | None:
    """The first written path that is, holds or shares a file with a read one or another written one."""
    fix = "choose another output path"
    for target in written:
        for source in read:
            if _same(target, source):
                return f"{target.label} is {source.label} ({source.real}); {fix}"
            if _inside(source, target):
                return f"{target.label} would hold {source.label} ({source.real}); {fix}"
    for i, first in enumerate(written):
        for second in written[i + 1 :]:
            if _same(first, second):
                return f"{first.label} and {second.label} are the same file ({first.real}); choose other paths"
            for inner, outer in ((first, second), (second, first)):
                if _inside(inner, outer):
                    return f"{inner.label} ({inner.path}) is inside {outer.label}; choose other paths"
    return None


def _wrong_kind(written: Iterable[_Place]) -> str | None:
    """A written file that is an existing folder or special file, or a checkpoint folder that is a file."""
    for place in written:
        try:
            mode = os.stat(place.real).st_mode
        except OSError:
            continue  # not there yet: it will be created
        if place.folder:
            if not stat.S_ISDIR(mode):
                return f"{place.label} exists and is not a folder; move it away or choose another output path"
        elif stat.S_ISDIR(mode):
            return (
                f"{place.label} is an existing folder ({place.path}); name a file, "
                "or end the path with / to write inside that folder"
            )
        elif not stat.S_ISREG(mode):
            return f"{place.label} exists and is not a regular file ({place.path}); choose another path"
    return None


def _check_writable_folder(output: Path, label: str, where: str, error: type[UsageError]) -> None:
    """The output's folder exists or can be made, and is writable."""
    folder = output.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir() or not os.access(folder, os.W_OK | os.X_OK):
        raise error(
            f"{where}{output}: cannot write there ({folder} is not a writable folder); choose another path for {label}"
        )
