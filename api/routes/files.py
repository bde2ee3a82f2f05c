"""/v1/files: upload (validated when purpose is fine-tune), list, get, content, delete."""

from __future__ import annotations

import hashlib
import io
from typing import BinaryIO

from fastapi import APIRouter, Form, Request, UploadFile
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from api.bulk import on_bulk_threads
from api.deps import ArtifactsDep, CurrentTenant, SessionDep, SettingsDep
from api.errors import APIError
from api.idempotency import IdempotencyDep
from api.responses import Download, JSONResponse, download_responses
from api.schemas import (
    DeletedObject,
    FileObject,
    ListOf,
    ObjectId,
    PageAfter,
    PageLimit,
    TextFilter,
    file_object,
)
from api.tenancy import Scoped, list_body
from store.jobstate import ACTIVE
from store.models import Job, StoredFile, new_id
from trainer.data import DataFileError, bounded_lines, summarize_lines

router = APIRouter(prefix="/v1/files", tags=["files"])
PURPOSES = ("fine-tune",)


def _label(filename: str | None) -> str:
    """The client's filename, kept as a display label only: no directories, bounded length."""
    name = (filename or "upload.jsonl").replace("\\", "/").rsplit("/", 1)[-1]
    name = "".join(ch for ch in name if ch.isprintable())
    return name[:255] or "upload.jsonl"


def _size(source: BinaryIO) -> int:
    source.seek(0, io.SEEK_END)
    size = source.tell()
    source.seek(0)
    return size


def _hashed(source: BinaryIO, digest):
    """The file's lines (each up to and including its newline, none held past the limit of one
    example), every byte fed to the digest on the way."""
    source.seek(0)
    return bounded_lines(source, on_bytes=digest.update)


def _stored_bytes(session: Session, tenant_id: str) -> int:
    return session.scalar(select(func.coalesce(func.sum(StoredFile.bytes), 0))
                          .where(StoredFile.tenant_id == tenant_id))


def _check_storage_quota(session: Session, tenant_id: str, size: int, settings) -> None:
    used = _stored_bytes(session, tenant_id)
    if used + size > settings.max_storage_bytes:
        raise APIError(429, f"This upload of {size} bytes would take the organization's stored "
                            f"files to {used + size} bytes, over the storage quota of "
                            f"max_storage_bytes={settings.max_storage_bytes}. Delete files you "
                            "no longer need.", type="rate_limit_error", param="file",
                       code="quota_storage_bytes")


# One file and short fields: `purpose`, and room for a few unknown ones, so that one gets the
# route's 400 naming it (`_only_declared_fields`). Starlette's defaults (1,000 files, 1,000
# fields, each part up to 1 MB in memory) let one request pin hundreds of MB while its form was
# parsed.
UPLOAD_FORM_LIMITS = {"max_files": 1, "max_fields": 8, "max_part_size": 1024}


@router.post("", response_model=FileObject, summary="Upload a JSONL file",
             responses={413: {"description": "File over max_upload_bytes"},
                        429: {"description": "Storage quota (max_storage_bytes) exceeded"}},
             form_limits=UPLOAD_FORM_LIMITS)
async def upload_file(request: Request, file: UploadFile, session: SessionDep,
                      tenant: CurrentTenant, artifacts: ArtifactsDep, settings: SettingsDep,
                      idem: IdempotencyDep,
                      purpose: str = Form(..., json_schema_extra={"enum": list(PURPOSES)})):
    _only_declared_fields(await request.form())  # parsed already: this is FastAPI's copy
    # Reading, validating and copying a large file holds a thread for seconds: not on the event
    # loop, and not on the few request threads (api.bulk).
    return await on_bulk_threads(settings, _store_upload, file, session, tenant, artifacts,
                                 settings, idem, purpose)


UPLOAD_FIELDS = ("file", "purpose")


def _only_declared_fields(form) -> None:
    """An upload takes one `file` and one `purpose`: anything else would be silently dropped
    (OpenAI's `expires_after`, say, which this service does not implement), and the document
    says so (additionalProperties: false)."""
    for name in dict.fromkeys(form.keys()):
        if name not in UPLOAD_FIELDS:
            raise APIError(400, f"Unknown form field {name!r}: an upload takes 'file' and "
                                "'purpose' only.", param=name, code="unknown_parameter")
        if len(form.getlist(name)) > 1:
            raise APIError(400, f"The form field {name!r} is given more than once.",
                           param=name, code="invalid_value")


def _store_upload(file: UploadFile, session: Session, tenant, artifacts, settings, idem,
                  purpose: str) -> JSONResponse:
    # The upload is already spooled to a temporary file; it is read one line at a time and
    # copied in chunks, never held whole in memory.
    if purpose not in PURPOSES:
        raise APIError(400, f"purpose must be one of {list(PURPOSES)}.", param="purpose")
    source = file.file
    size = _size(source)
    if size > settings.max_upload_bytes:
        raise APIError(413, f"File exceeds the upload limit of {settings.max_upload_bytes} bytes.",
                       param="file", code="file_too_large")
    digest = hashlib.sha256()
    try:
        summary = summarize_lines(_hashed(source, digest))
    except DataFileError as e:
        raise APIError(400, f"Invalid training file: {e}", param="file",
                       code="invalid_file_format") from None
    if summary.examples > settings.max_training_examples:
        raise APIError(400, f"{summary.examples} examples exceed the limit of "
                            f"{settings.max_training_examples}.", param="file")
    label = _label(file.filename)

    def produce() -> JSONResponse:
        # Copied before the quota query: no transaction is open while the disk works. An upload
        # the quota refuses is deleted again.
        file_id = new_id("file-")
        storage_path = artifacts.file_path(tenant.id, file_id)
        source.seek(0)
        artifacts.write_stream(storage_path, source)
        idem.on_rollback(lambda: artifacts.delete(storage_path))  # no file without its row
        Scoped(session, tenant).take_turns()  # concurrent uploads cannot overshoot the quota
        _check_storage_quota(session, tenant.id, size, settings)
        row = StoredFile(id=file_id, tenant_id=tenant.id, filename=label, purpose=purpose,
                         bytes=size, sha256=digest.hexdigest(), lines=summary.examples,
                         qa_only=summary.qa_only, storage_path=storage_path)
        session.add(row)
        session.flush()
        return JSONResponse(file_object(row))

    return idem.run({"purpose": purpose, "filename": label, "sha256": digest.hexdigest()},
                    produce, look_first=True)


@router.get("", response_model=ListOf, summary="List files")
def list_files(session: SessionDep, tenant: CurrentTenant, after: PageAfter = None,
               limit: PageLimit = 20, purpose: TextFilter = None):
    scoped = Scoped(session, tenant)
    query = scoped.select(StoredFile)
    if purpose:
        query = query.where(StoredFile.purpose == purpose)
    rows, more = scoped.page(query, StoredFile, after=after, limit=limit)
    return list_body([file_object(r) for r in rows], more)


@router.get("/{file_id}", response_model=FileObject, summary="Retrieve a file")
def get_file(file_id: ObjectId, session: SessionDep, tenant: CurrentTenant):
    return file_object(Scoped(session, tenant).get(StoredFile, file_id, "file"))


@router.get("/{file_id}/content", summary="The file's bytes",
            responses=download_responses("application/jsonl"))
def file_content(file_id: ObjectId, session: SessionDep, tenant: CurrentTenant,
                 artifacts: ArtifactsDep):
    row = Scoped(session, tenant).get(StoredFile, file_id, "file")
    path = artifacts.path(row.storage_path)
    if not path.is_file():
        raise APIError(404, f"The content of file '{file_id}' is missing from storage.",
                       param="file_id", code="file_content_missing")
    return Download(path, media_type="application/jsonl")  # streamed in chunks


@router.delete("/{file_id}", response_model=DeletedObject, summary="Delete a file",
               responses={409: {"description": "A queued or running job uses the file"}})
def delete_file(file_id: ObjectId, session: SessionDep, tenant: CurrentTenant,
                artifacts: ArtifactsDep):
    scoped = Scoped(session, tenant)
    # In turn with the tenant's job creations (which take turns under a quota, the default): a
    # job created meanwhile is either seen here (409) or finds the file gone (400), never queued
    # on a deleted file.
    scoped.take_turns()
    row = scoped.get(StoredFile, file_id, "file")
    user = session.scalar(scoped.select(Job).where(Job.status.in_(ACTIVE)).where(
        (Job.training_file == file_id) | (Job.validation_file == file_id)
        | (Job.known_facts_file == file_id)))
    if user is not None:
        raise APIError(409, f"File '{file_id}' is used by job '{user.id}', which is still "
                            f"{user.status}; cancel it or wait for it to finish.", param="file_id",
                       code="file_in_use")
    path = row.storage_path
    session.delete(row)
    session.commit()
    artifacts.delete(path)
    return {"id": file_id, "object": "file", "deleted": True}


