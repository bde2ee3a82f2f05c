"""/v1/files: upload (validated when purpose is fine-tune), list, get, content, delete."""

from __future__ import annotations

import hashlib

from fastapi import APIRouter, Form, Request, UploadFile
from fastapi.responses import JSONResponse, Response

from api.deps import ArtifactsDep, CurrentTenant, SessionDep, SettingsDep
from api.errors import APIError
from api.idempotency import IdempotencyDep
from api.schemas import DeletedObject, FileObject, ListOf, file_object
from api.tenancy import Scoped, list_body
from store.models import Job, StoredFile
from trainer.data import DataFileError, parse_bytes

router = APIRouter(prefix="/v1/files", tags=["files"])
PURPOSES = ("fine-tune",)
ACTIVE = ("validating_files", "queued", "running")


def _label(filename: str | None) -> str:
    """The client's filename, kept as a display label only: no directories, bounded length."""
    name = (filename or "upload.jsonl").replace("\\", "/").rsplit("/", 1)[-1]
    name = "".join(ch for ch in name if ch.isprintable())
    return name[:255] or "upload.jsonl"


@router.post("", response_model=FileObject, summary="Upload a JSONL file")
async def upload_file(request: Request, file: UploadFile, session: SessionDep,
                      tenant: CurrentTenant, artifacts: ArtifactsDep, settings: SettingsDep,
                      idem: IdempotencyDep, purpose: str = Form(...)):
    data = await file.read(settings.max_upload_bytes + 1)
    if len(data) > settings.max_upload_bytes:
        raise APIError(413, f"File exceeds the upload limit of {settings.max_upload_bytes} bytes.",
                       param="file", code="file_too_large")
    digest = hashlib.sha256(data).hexdigest()
    label = _label(file.filename)

    def produce() -> JSONResponse:
        if purpose not in PURPOSES:
            raise APIError(400, f"purpose must be one of {list(PURPOSES)}.", param="purpose")
        try:
            examples = parse_bytes(data)
        except DataFileError as e:
            raise APIError(400, f"Invalid training file: {e}", param="file",
                           code="invalid_file_format") from None
        if len(examples) > settings.max_training_examples:
            raise APIError(400, f"{len(examples)} examples exceed the limit of "
                                f"{settings.max_training_examples}.", param="file")
        qa_only = all(len(ex.messages) == 2 and ex.messages[0]["role"] == "user" for ex in examples)
        row = StoredFile(tenant_id=tenant.id, filename=label, purpose=purpose, bytes=len(data),
                         sha256=digest, lines=len(examples), qa_only=qa_only, storage_path="")
        session.add(row)
        session.flush()  # assigns the id the path is made from
        row.storage_path = artifacts.file_path(tenant.id, row.id)
        artifacts.write_bytes(row.storage_path, data)
        try:
            session.commit()
        except BaseException:
            artifacts.delete(row.storage_path)  # no file without its row
            raise
        return JSONResponse(file_object(row))

    return idem.run({"purpose": purpose, "filename": label, "sha256": digest}, produce)


@router.get("", response_model=ListOf, summary="List files")
def list_files(session: SessionDep, tenant: CurrentTenant, after: str | None = None,
               limit: int = 20, purpose: str | None = None):
    scoped = Scoped(session, tenant)
    query = scoped.select(StoredFile)
    if purpose:
        query = query.where(StoredFile.purpose == purpose)
    rows, more = scoped.page(query, StoredFile, after=after, limit=limit)
    return list_body([file_object(r) for r in rows], more)


@router.get("/{file_id}", response_model=FileObject, summary="Retrieve a file")
def get_file(file_id: str, session: SessionDep, tenant: CurrentTenant):
    return file_object(Scoped(session, tenant).get(StoredFile, file_id, "file"))


@router.get("/{file_id}/content", summary="The file's bytes")
def file_content(file_id: str, session: SessionDep, tenant: CurrentTenant, artifacts: ArtifactsDep):
    row = Scoped(session, tenant).get(StoredFile, file_id, "file")
    return Response(artifacts.path(row.storage_path).read_bytes(), media_type="application/jsonl")


@router.delete("/{file_id}", response_model=DeletedObject, summary="Delete a file")
def delete_file(file_id: str, session: SessionDep, tenant: CurrentTenant, artifacts: ArtifactsDep):
    scoped = Scoped(session, tenant)
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


