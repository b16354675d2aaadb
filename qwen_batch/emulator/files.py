"""The Batch API's file store: ``/files`` upload, metadata, content and delete (reference section 7.1, 7.6).

Files live in memory for the emulator's lifetime, so a client killed and rerun finds its
uploads and its results again. Uploads are ``purpose=batch`` JSONL; the files a batch
writes (its output and error files) are stored here too, and only those can be downloaded:
"Only files whose file_id starts with file-batch_output can be downloaded" (section 7.6),
read as "only result files", since the error file is downloadable too.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from typing import Any

import aiohttp
from aiohttp import web

INPUT_PREFIX = "file-batch-"
OUTPUT_PREFIX = "file-batch_output-"
BATCH_PURPOSE = "batch"
RESULT_PURPOSE = "batch_output"


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
    content: bytes

    def object(self) -> dict[str, Any]:
        """The file object, as the upload capture shows it."""
        return {"id": self.id, "bytes": len(self.content), "created_at": self.created_at, "filename": self.filename,
                "object": "file", "purpose": self.purpose, "status": "processed", "status_details": None}


class FileStore:
    """Every file of the emulated account, by id."""

    def __init__(self) -> None:
        self._files: dict[str, StoredFile] = {}

    def add(self, content: bytes, filename: str, purpose: str, prefix: str = INPUT_PREFIX) -> StoredFile:
        stored = StoredFile(prefix + str(uuid.uuid4()), filename, purpose, int(time.time()), content)
        self._files[stored.id] = stored
        return stored

    def get(self, file_id: str) -> StoredFile:
        stored = self._files.get(file_id)
        if stored is None:
            raise FileApiError(404, f"No such file: {file_id}", code="not_found", param="file_id")
        return stored

    def delete(self, file_id: str) -> dict[str, Any]:
        self.get(file_id)
        del self._files[file_id]
        return {"id": file_id, "object": "file", "deleted": True}

    def content(self, file_id: str) -> bytes:
        stored = self.get(file_id)
        if stored.purpose != RESULT_PURPOSE:
            raise FileApiError(400, "Only files written by a batch (its output and error files) can be downloaded.",
                               code="invalid_request_error", param="file_id")
        return stored.content


async def read_upload(request: web.Request) -> tuple[bytes, str, str]:
    """(content, filename, purpose) of a multipart upload; streamed, so a file may exceed the body limit."""
    try:
        reader = await request.multipart()
    except (AssertionError, ValueError, KeyError):
        raise FileApiError(400, "The upload must be multipart/form-data with fields 'file' and 'purpose'.") from None
    content: bytes | None = None
    filename = ""
    purpose = ""
    while (part := await reader.next()) is not None:
        if not isinstance(part, aiohttp.BodyPartReader):
            continue
        if part.name == "file":
            filename = part.filename or "file.jsonl"
            content = bytes(await part.read())
        elif part.name == "purpose":
            purpose = (await part.text()).strip()
    if content is None:
        raise FileApiError(400, "Missing required field 'file'.", param="file")
    if purpose != BATCH_PURPOSE:
        raise FileApiError(400, f"'purpose' must be 'batch', not {purpose!r}.", param="purpose")
    return content, filename, purpose
