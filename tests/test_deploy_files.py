"""docker compose cannot run here (no Docker engine), so the compose file is checked by reading:
its shape, its health and start-up ordering, and that every setting it passes is one we read."""

from pathlib import Path

import yaml

from store.settings import Settings

ROOT = Path(__file__).resolve().parents[1]


def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def test_services_health_and_ordering():
    services = compose()["services"]
    assert {"api", "worker", "redis", "postgres", "migrate"} <= set(services)
    for name in ("api", "worker", "redis", "postgres"):
        assert "healthcheck" in services[name], name
    for name in ("api", "worker"):
        deps = services[name]["depends_on"]
        assert deps["migrate"]["condition"] == "service_completed_successfully"
        assert deps["redis"]["condition"] == "service_healthy"
    assert services["migrate"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    gpu = services["worker"]["deploy"]["resources"]["reservations"]["devices"][0]
    assert gpu["capabilities"] == ["gpu"] and gpu["count"] == 1


def test_settings_come_only_from_known_environment_variables():
    fields = {f"DRIFTSAFE_{name.upper()}" for name in Settings.model_fields}
    for name, service in compose()["services"].items():
        env = service.get("environment") or {}
        for key in env:
            if key.startswith("DRIFTSAFE_"):
                assert key in fields, (name, key)
    env = compose()["services"]["api"]["environment"]
    assert env["DRIFTSAFE_DATABASE_URL"].startswith("postgresql+psycopg://")
    assert env["DRIFTSAFE_BROKER_URL"].startswith("redis://")
    s = Settings(**{k[len("DRIFTSAFE_"):].lower(): v for k, v in env.items()
                    if k != "DRIFTSAFE_SECRET_KEY"})
    assert s.sqlalchemy_url == env["DRIFTSAFE_DATABASE_URL"]


def test_images_use_commands_that_exist():
    from cli.main import build_parser

    parser = build_parser()
    for name in ("api", "worker"):
        cmd = compose()["services"][name]["command"]
        assert cmd[0] == "driftsafe"
        parser.parse_args(cmd[1:])  # exits non-zero on an unknown command
    dockerfile = (ROOT / "Dockerfile").read_text()
    for package in ("api", "worker", "trainer", "store", "cli"):
        assert f"COPY {package} {package}" in dockerfile


def test_postgres_takes_the_connections_the_api_processes_keep():
    """Each API process may keep up to db_pool_size + db_max_overflow connections open:
    PostgreSQL's limit must hold two API replicas of the compose file's process
    count and a dozen workers of a few connections each."""
    services = compose()["services"]
    command = services["postgres"]["command"]
    limit = int(command[command.index("-c") + 1].split("=")[1])
    api = services["api"]["command"]
    processes = int(api[api.index("--workers") + 1])
    fields = Settings.model_fields
    per_process = fields["db_pool_size"].default + fields["db_max_overflow"].default
    assert limit >= 2 * processes * per_process + 12 * 4
