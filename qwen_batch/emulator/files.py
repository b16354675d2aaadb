"""The Batch API's file store: ``/files`` upload, metadata, content and delete (reference section 7.1, 7.6).

Files last for the emulator's lifetime, so a client killed and rerun finds its uploads and
its results again. They are kept on disk in a private temporary folder (removed at
shutdown), not in memory: a job of many 50,000-line files would otherwise hold every input
and every result in the process that may be the client's own (``run --emulate``). Uploads
are ``purpose=batch`` JSONL, streamed to disk; the files a batch writes (its output and
error files) are stored here too, and only those can be downloaded: "Only files whose
file_id starts with file-batch_output can be downloaded" (section 7.6), read as "only result
files", since an error file is downloadable too.
"""

from __future__ import annotations

import hashlib
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, TypeVar

import aiohttp
from aiohttp import web

INPUT_PREFIX = "file-batch-"
OUTPUT_PREFIX = "file-batch_output-"
BATCH_PURPOSE = "batch"
RESULT_PURPOSE = "batch_output"
_CHUNK_BYTES = 1 << 20


MAX_LISTED = 100
DEFAULT_LISTED = 20
T = TypeVar("T")


class FileApiError(Exception):
    """A refusal of the files or batches API, sent as an OpenAI-style error body."""

    def __init__(self, status: int, message: str, *, code: str | None = None, param: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.param = param


@dataclass(frozen=True, slots=True)
class StoredFile:
    """One file: an upload, or a result a batch wrote."""

    id: str
    filename: str
    purpose: str
    created_at: int
    path: Path
    bytes: int

    def object(self) -> dict[str, Any]:
        """The file object, as the upload capture shows it."""
        return {"id": self.id, "bytes": self.bytes, "created_at": self.created_at, "filename": self.filename,
                "object": "file", "purpose": self.purpose, "status": "processed", "status_details": None}


class FileStore:
    """Every file of the emulated account, by id, each one on disk."""

    def __init__(self) -> None:
        self._files: dict[str, StoredFile] = {}
        self._folder: Path | None = None

    def new_path(self) -> Path:
        """A fresh path in the store's folder (created on first use) to write a file to."""
        if self._folder is None:
            self._folder = Path(tempfile.mkdtemp(prefix="qwen-batch-emulator-files-"))
        return self._folder / uuid.uuid4().hex

    def add(self, path: Path, filename: str, purpose: str, prefix: str = INPUT_PREFIX) -> StoredFile:
        """Register a file written at ``path`` (from ``new_path``)."""
        stored = StoredFile(prefix + str(uuid.uuid4()), filename, purpose, int(time.time()), path,
                            path.stat().st_size)
        self._files[stored.id] = stored
        return stored

    def listing(self, query: dict[str, str]) -> dict[str, Any]:
        """``GET /files``: newest first, a page of ``limit`` (1-100, default 20) after ``after``."""
        limit = page_limit(query.get("limit"))
        found = list(reversed(self._files.values()))
        page, more = page_after(found, query.get("after"), limit, lambda stored: stored.id)
        return {"object": "list", "data": [stored.object() for stored in page], "has_more": more,
                "first_id": page[0].id if page else None, "last_id": page[-1].id if page else None}

    def get(self, file_id: str) -> StoredFile:
        stored = self._files.get(file_id)
        if stored is None:
            raise FileApiError(404, f"No such file: {file_id}", code="not_found", param="file_id")
        return stored

    def open(self, file_id: str) -> IO[bytes]:
        """The file's content for reading; a batch holds it open, so deleting the file later does not stop it."""
        return open(self.get(file_id).path, "rb")  # noqa: SIM115 - the batch closes it

    def delete(self, file_id: str) -> dict[str, Any]:
        self.get(file_id).path.unlink(missing_ok=True)
        del self._files[file_id]
        return {"id": file_id, "object": "file", "deleted": True}

    def result(self, file_id: str) -> StoredFile:
        """A file that may be downloaded: one a batch wrote."""
        stored = self.get(file_id)
        if stored.purpose != RESULT_PURPOSE:
            raise FileApiError(400, "Only files written by a batch (its output and error files) can be downloaded.",
                               code="invalid_request_error", param="file_id")
        return stored

    def close(self) -> None:
        """Remove every file (emulator shutdown)."""
        if self._folder is not None:
            shutil.rmtree(self._folder, ignore_errors=True)
            self._folder = None


def page_limit(text: str | None) -> int:
    """A list call's ``limit`` (1-100, default 20)."""
    if text is None:
        return DEFAULT_LISTED
    if not text.isdigit() or not 1 <= int(text) <= MAX_LISTED:
        raise FileApiError(400, f"limit must be a whole number from 1 to {MAX_LISTED}.", param="limit")
    return int(text)


def page_after(items: list[T], after: str | None, limit: int, id_of: Callable[[T], str]) -> tuple[list[T], bool]:
    """The page of ``items`` that follows the one with id ``after`` (none: from the start), and whether more follow."""
    if after:
        ids = [id_of(item) for item in items]
        items = items[ids.index(after) + 1:] if after in ids else []
    return items[:limit], len(items) > limit


async def receive_upload(request: web.Request, store: FileStore) -> tuple[StoredFile, str]:
    """Store a multipart upload (``file``, ``purpose=batch``), streamed to disk (a file may exceed the
    body limit); the file and the sha256 of its content."""
    try:
        reader = await request.multipart()
    except (AssertionError, ValueError, KeyError):
        raise FileApiError(400, "The upload must be multipart/form-data with fields 'file' and 'purpose'.") from None
    path: Path | None = None
    filename = ""
    purpose = ""
    digest = ""
    try:
        while (part := await reader.next()) is not None:
            if not isinstance(part, aiohttp.BodyPartReader):
                continue
            if part.name == "file" and path is None:
                filename = part.filename or "file.jsonl"
                path = store.new_path()
                digest = await _save(part, path)
            elif part.name == "purpose":
                purpose = (await part.text()).strip()
        if path is None:
            raise FileApiError(400, "Missing required field 'file'.", param="file")
        if purpose != BATCH_PURPOSE:
            raise FileApiError(400, f"'purpose' must be 'batch', not {purpose!r}.", param="purpose")
    except BaseException:
        if path is not None:
            path.unlink(missing_ok=True)
        raise
    return store.add(path, filename, purpose), digest


async def _save(part: aiohttp.BodyPartReader, path: Path) -> str:
    """Write the part to ``path``; the sha256 of what was written."""
    sha = hashlib.sha256()
    with open(path, "wb") as out:
        while chunk := await part.read_chunk(_CHUNK_BYTES):
            sha.update(chunk)
            out.write(chunk)
    return sha.hexdigest()
