"""/v1/models: base models that can be fine-tuned here."""

from fastapi import APIRouter

from api.deps import CurrentTenant, SettingsDep
from api.errors import not_found
from api.models_registry import model_objects
from api.schemas import ListOf, ModelObject

router = APIRouter(prefix="/v1/models", tags=["models"])


@router.get("", response_model=ListOf, summary="List base models")
def list_models(settings: SettingsDep, _tenant: CurrentTenant):
    data = model_objects(settings)
    return {"object": "list", "data": data, "has_more": False,
            "first_id": data[0]["id"], "last_id": data[-1]["id"]}


@router.get("/{model_id}", response_model=ModelObject, summary="Retrieve a base model")
def get_model(model_id: str, settings: SettingsDep, _tenant: CurrentTenant):
    for m in model_objects(settings):
        if m["id"] == model_id:
            return m
    raise not_found("model", model_id)
