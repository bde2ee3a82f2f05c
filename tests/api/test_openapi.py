"""/openapi.json describes the API as it behaves: fast structural checks (the slow proof is
test_schemathesis.py), and the behaviours the document promises that FastAPI alone did not give."""

from __future__ import annotations

import re

import jsonschema_rs
import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from api.app import create_app
from api.models_registry import known_model_ids
from api.schemas import WEBHOOK_URL_PATTERN, WebhookCreate
from store.netguard import parse
from store.settings import Settings
from tests.api.conftest import h

ENVELOPE = {"$ref": "#/components/schemas/Error"}
METHODS = ("get", "put", "post", "delete", "patch", "options", "head", "trace")


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    return create_app(Settings(data_dir=tmp_path_factory.mktemp("openapi"), secret_key="s"))


@pytest.fixture(scope="module")
def doc(app):
    with TestClient(app) as client:
        return client.get("/openapi.json").json()


def operations(doc):
    for path, item in doc["paths"].items():
        for method, op in item.items():
            if method in METHODS:
                yield f"{method.upper()} {path}", op


def test_the_document_is_valid_openapi_3_1(doc):
    from schemathesis.specs.openapi.definitions import OPENAPI_31_VALIDATOR

    OPENAPI_31_VALIDATOR.validate(doc)  # the OpenAPI 3.1 meta-schema, as Schemathesis loads it
    for name, schema in doc["components"]["schemas"].items():
        assert jsonschema_rs.meta.is_valid(schema), name
    text = str(doc)
    for ref in set(re.findall(r"'\$ref': '#/components/schemas/([^']+)'", text)):
        assert ref in doc["components"]["schemas"], ref
    assert "HTTPValidationError" not in text  # FastAPI's 422 shape: this API answers 400


def test_every_operation_declares_its_errors_with_the_envelope(doc):
    for label, op in operations(doc):
        responses = op["responses"]
        # Every operation: the body limiter reads any request's body (too large: 413, nested
        # too deep: 400), whether or not the route takes one.
        assert {"400", "413", "500"} <= set(responses), label
        params = op.get("parameters", [])
        if op.get("security"):
            assert {"401", "429"} <= set(responses), label
            assert "Retry-After" in responses["429"]["headers"], label
        if any(p["in"] == "path" for p in params):
            assert "404" in responses, label
        if "requestBody" in op:
            assert {"413", "415"} <= set(responses), label
        if any(p["name"] == "Idempotency-Key" for p in params):
            assert "422" in responses, label
        for status, response in responses.items():
            if int(status) >= 400 and label != "GET /healthz":
                schema = response["content"]["application/json"]["schema"]
                assert schema == ENVELOPE, (label, status)
    envelope = doc["components"]["schemas"]["Error"]["properties"]["error"]
    assert envelope["required"] == ["message", "type", "param", "code"]


def test_authenticated_operations_and_their_statuses(doc):
    ops = dict(operations(doc))
    assert doc["components"]["securitySchemes"]["bearerAuth"]["scheme"] == "bearer"
    assert "security" not in ops["GET /healthz"] and set(ops["GET /healthz"]["responses"]) == {
        "200", "400", "413", "500", "503"}
    for label, op in ops.items():
        if label != "GET /healthz":
            assert op["security"] == [{"bearerAuth": []}], label
    assert "409" in ops["POST /v1/fine_tuning/jobs/{job_id}/cancel"]["responses"]
    assert "409" in ops["DELETE /v1/files/{file_id}"]["responses"]
    for label in ("POST /v1/files", "POST /v1/fine_tuning/jobs", "POST /v1/webhooks",
                  "POST /v1/fine_tuning/jobs/{job_id}/cancel"):
        assert any(p["name"] == "Idempotency-Key" for p in ops[label]["parameters"]), label
    limit = next(p for p in ops["GET /v1/files"]["parameters"] if p["name"] == "limit")
    assert (limit["schema"]["minimum"], limit["schema"]["maximum"]) == (1, 100)
    assert list(ops["GET /v1/files/{file_id}/content"]["responses"]["200"]["content"]) == [
        "application/jsonl"]
    for label in ("GET /v1/files/{file_id}/content", "GET /v1/fine_tuning/jobs/{job_id}/adapter",
                  "GET /v1/fine_tuning/checkpoints/{checkpoint_id}/adapter"):
        assert {"200", "206", "416"} <= set(ops[label]["responses"]), label


def test_request_schemas_are_as_strict_as_validation(app, doc):
    schemas = doc["components"]["schemas"]
    job = schemas["JobCreate"]
    assert job["properties"]["model"]["enum"] == known_model_ids(app.state.settings)
    # what the jobs route refuses of hyperparameters, method and preset, the schema refuses too
    from jsonschema_rs import Draft202012Validator  # Schemathesis's own validator

    rules = Draft202012Validator({"allOf": job["allOf"]})
    sd, sft = {"type": "self_distillation"}, {"type": "supervised"}
    for body, valid in [({"hyperparameters": {}, "method": sft}, False),
                        ({"hyperparameters": {}, "preset": "drift_safe"}, False),
                        ({"method": sft, "preset": "drift_safe"}, False),
                        ({"method": sd, "preset": "drift_safe"}, True),
                        ({"hyperparameters": {}, "preset": None}, True),
                        ({"method": sft, "preset": None}, True)]:
        assert rules.is_valid(body) is valid, body
    metadata = job["properties"]["metadata"]["anyOf"][0]
    assert metadata["maxProperties"] == 16 and metadata["propertyNames"]["maxLength"] == 64
    assert metadata["additionalProperties"]["maxLength"] == 512
    # A list filter names its key, and a cursor is an id: neither may be empty.
    listing = {p["name"]: p for p in doc["paths"]["/v1/fine_tuning/jobs"]["get"]["parameters"]}
    assert listing["metadata"]["schema"]["propertyNames"]["minLength"] == 1
    assert listing["after"]["schema"]["anyOf"][0]["minLength"] == 1
    assert "allOf" in schemas["Method"] and "not" in schemas["SupervisedHyperparameters"]
    trainable = schemas["FrozenGroupsHyperparameters"]["properties"]["trainable"]["items"]
    assert trainable["pattern"].startswith("^(attention|")
    assert schemas["WebhookCreate"]["properties"]["url"]["pattern"] == WEBHOOK_URL_PATTERN
    upload = doc["paths"]["/v1/files"]["post"]["requestBody"]["content"]["multipart/form-data"]
    ref = upload["schema"]["$ref"].rsplit("/", 1)[-1]
    assert schemas[ref]["properties"]["purpose"]["enum"] == ["fine-tune"]
    assert schemas[ref]["additionalProperties"] is False  # the route refuses other fields
    assert listing["metadata"]["schema"]["maxProperties"] == 16  # and more filters


@settings(max_examples=150, deadline=None, database=None,
          suppress_health_check=list(HealthCheck))
@given(st.from_regex(WEBHOOK_URL_PATTERN, fullmatch=True))
def test_every_url_the_pattern_admits_is_one_the_sender_can_parse(url):
    parse(url)  # no RefusedURL: the pattern is no looser than store.netguard


@pytest.mark.parametrize("url", [
    "ftp://example.com/x", "HTTP://example.com", "http://exa mple.com", "http://example.com/a b",
    "http://example.com/\x00", "http://example.com/\x7f", "http://exa\tmple.com", "http://u:p@h.com",
    "http://h.com:0", "http://h.com:65536", "http://1.2.3.999/", "http://", "https://[::1]/",
    "http://example.com/\u2028"])
def test_bad_webhook_urls_are_refused_by_the_schema(url):
    assert re.fullmatch(WEBHOOK_URL_PATTERN, url) is None
    with pytest.raises(ValidationError):
        WebhookCreate(url=url)


def test_405_answers_name_every_allowed_method(app):
    with TestClient(app) as client:
        r = client.options("/v1/files/file-abc")
        assert r.status_code == 405 and r.headers["allow"] == "DELETE, GET"
        assert r.json()["error"]["type"] == "invalid_request_error"
        assert client.put("/v1/webhooks").headers["allow"] == "GET, POST"
        assert client.delete("/v1/fine_tuning/jobs").headers["allow"] == "GET, POST"


def test_a_body_in_another_media_type_is_415(client, alice):
    r = client.post("/v1/webhooks", headers=h(alice, **{"Content-Type": "text/plain"}),
                    content=b'{"url": "https://93.184.215.14/"}')
    assert r.status_code == 415 and r.json()["error"]["code"] == "unsupported_media_type"
    r = client.post("/v1/files", headers=h(alice), json={"purpose": "fine-tune"})
    assert r.status_code == 415 and "multipart/form-data" in r.json()["error"]["message"]
    r = client.post("/v1/webhooks", headers=h(alice, **{"Content-Type": "application/json"}),
                    content=b"[]")
    assert r.status_code == 400  # the right media type, the wrong shape


@pytest.mark.parametrize("method, url, body", [
    ("get", "/v1/files/file-a%00b", None),
    ("get", "/v1/files?after=a%00b", None),
    ("get", "/v1/files?purpose=fine%00tune", None),
    ("get", "/v1/fine_tuning/jobs?status=queued%00", None),
    ("get", "/v1/fine_tuning/jobs?metadata%5Bteam%5D=a%00", None),
    ("get", "/v1/fine_tuning/jobs?metadata%5Bte%00am%5D=a", None),
    ("delete", "/v1/webhooks/wh_%00", None),
    ("post", "/v1/webhooks", {"url": "https://93.184.215.14/\u0000"}),
    ("post", "/v1/fine_tuning/jobs", {"model": "driftsafe-factlm-tiny",
                                      "training_file": "f\u0000"}),
    ("post", "/v1/fine_tuning/jobs", {"model": "driftsafe-factlm-tiny", "training_file": "f",
                                      "metadata": {"k": "v\u0000"}}),
    ("post", "/v1/fine_tuning/jobs", {"model": "driftsafe-factlm-tiny", "training_file": "f",
                                      "evaluation": {"known_facts_file": "\u0000"}}),
])
def test_control_characters_are_a_400_not_a_500(client, alice, method, url, body):
    # PostgreSQL cannot hold a NUL in text: these were 500s there before the document (and
    # validation) said that ids, names and URLs hold no control characters.
    r = client.request(method, url, headers=h(alice), json=body)
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_value"
