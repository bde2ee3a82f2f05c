"""The artifact store: files on a local (or mounted) filesystem under one root.

Every path is made here from server-side ids (tenant id, object id); nothing a client sends
becomes part of a path. Writes go to a temporary name and are renamed into place.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO


class ArtifactStore:
    def __init__(self, root: Path):
        self.root = Path(root).resolve()

    def _resolve(self, relative: str) -> Path:
        path = (self.root / relative).resolve()
        if self.root not in path.parents:
            raise ValueError("artifact path escapes the store root")  # only a bug can do this
        return path

    def file_path(self, tenant_id: str, file_id: str) -> str:
        return f"{tenant_id}/files/{file_id}.jsonl"

    def job_dir(self, tenant_id: str, job_id: str) -> str:
        return f"{tenant_id}/jobs/{job_id}"

    @contextmanager
    def replacing(self, relative: str) -> Iterator[Path]:
        """A temporary path to write the artifact at; it is renamed into place when the block
        ends, or removed if the block fails, so a reader never sees half a file."""
        path = self._resolve(relative)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
        try:
            yield tmp
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    def write_bytes(self, relative: str, data: bytes) -> Path:
        with self.replacing(relative) as tmp:
            tmp.write_bytes(data)
        return self._resolve(relative)

    def write_stream(self, relative: str, source: BinaryIO, chunk_bytes: int = 1024 * 1024
                     ) -> Path:
        """Copy a readable binary file here in chunks (never whole in memory)."""
        with self.replacing(relative) as tmp, open(tmp, "wb") as out:
            shutil.copyfileobj(source, out, chunk_bytes)
        return self._resolve(relative)

    def path(self, relative: str) -> Path:
        return self._resolve(relative)

    def delete(self, relative: str) -> None:
        path = self._resolve(relative)
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
