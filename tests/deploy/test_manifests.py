"""The deployment files agree with the code: Kubernetes manifests valid against the API's schemas,
every environment variable they set is a setting of a service that reads it, commands, ports and
probes are the services' own, and the example secret cannot start a production service unchanged.
Neither Kubernetes nor Docker runs here, so this is what keeps `deploy/kubernetes/` and
`docker-compose.yml` from rotting as settings and routes change."""

from __future__ import annotations

import copy
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import kubernetes_validate
import pytest
import trustme
import yaml
from fastapi import FastAPI
from pydantic import AliasChoices, SecretStr, ValidationError

from services.ingest.app import create_app as ingest_app
from services.ingest.settings import IngestSettings
from services.journey_engine.app import create_app as journey_app
from services.journey_engine.settings import JourneyEngineSettings
from services.notifier.app import create_app as notifier_app
from services.notifier.settings import NotifierSettings
from services.segmenter.app import create_app as segmenter_app
from services.segmenter.settings import SegmenterSettings
from shared.settings import BaseServiceSettings

ROOT = Path(__file__).resolve().parents[2]
KUBERNETES = ROOT / "deploy" / "kubernetes"
# The oldest Kubernetes still widely run, and the newest the schemas package knows.
KUBERNETES_VERSIONS = ("1.31.0", "1.37.0")

SETTINGS: dict[str, type[BaseServiceSettings]] = {
    "ingest": IngestSettings,
    "segmenter": SegmenterSettings,
    "journey_engine": JourneyEngineSettings,
    "notifier": NotifierSettings,
}
APPS = {
    "ingest": ingest_app,
    "segmenter": segmenter_app,
    "journey_engine": journey_app,
    "notifier": notifier_app,
}


def env_names(settings_class: type[BaseServiceSettings]) -> set[str]:
    """The environment variables a settings class reads."""
    names = set()
    for name, field in settings_class.model_fields.items():
        alias = field.validation_alias
        if isinstance(alias, AliasChoices):
            names.update(str(choice) for choice in alias.choices)
        else:
            names.add(f"CLM_{name.upper()}")
    return names


async def answers_of(app: FastAPI, paths: list[str]) -> list[int]:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://clm") as client:
        return [(await client.get(path)).status_code for path in paths]


def documents(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def manifests() -> Iterator[tuple[str, dict[str, Any]]]:
    for path in sorted(KUBERNETES.glob("*.yaml")):
        if path.name != "kustomization.yaml":
            for doc in documents(path):
                yield path.name, doc


def deployments() -> Iterator[tuple[str, dict[str, Any]]]:
    """(service module, Deployment) for each CLM service."""
    for _, doc in manifests():
        if doc["kind"] == "Deployment":
            command = doc["spec"]["template"]["spec"]["containers"][0]["command"]
            assert command[:2] == ["python", "-m"] and command[2].startswith("services."), command
            yield command[2].removeprefix("services."), doc


def config_map() -> dict[str, str]:
    (doc,) = [d for _, d in manifests() if d["kind"] == "ConfigMap"]
    data: dict[str, str] = doc["data"]
    return data


def example_secret() -> dict[str, str]:
    (doc,) = documents(KUBERNETES / "secret.example.yaml")
    data: dict[str, str] = doc["stringData"]
    return data


def commented(name: str) -> dict[str, str]:
    """The settings a manifest has commented out, ready to uncomment (`  # NAME: value` lines)."""
    found: dict[str, str] = {}
    for line in (KUBERNETES / name).read_text().splitlines():
        if match := re.fullmatch(r"  # ([A-Z][A-Z0-9_]*: .*)", line):
            found.update(yaml.safe_load(match[1]))
    return {key: str(value) for key, value in found.items()}


def kafka_sasl_ssl(ca_file: Path) -> dict[str, str]:
    """The ConfigMap's commented SASL_SSL block, uncommented, with a CA file that exists."""
    block = {key: value for key, value in commented("config.yaml").items() if key.startswith("CLM_KAFKA_")}
    assert block["CLM_KAFKA_SECURITY_PROTOCOL"] == "SASL_SSL"
    assert block.keys() == {
        "CLM_KAFKA_SECURITY_PROTOCOL",
        "CLM_KAFKA_SASL_MECHANISM",
        "CLM_KAFKA_SASL_USERNAME",
        "CLM_KAFKA_SSL_CA_FILE",
    }
    assert "CLM_KAFKA_SASL_PASSWORD" in commented("secret.example.yaml")
    trustme.CA().cert_pem.write_to_path(str(ca_file))
    return {**block, "CLM_KAFKA_SSL_CA_FILE": str(ca_file)}


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_every_manifest_is_valid_for_the_kubernetes_api(version: str) -> None:
    checked = 0
    for name, doc in manifests():
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{name} ({doc['kind']} {doc['metadata']['name']}): {exc}")
        checked += 1
    assert checked >= 10
    # The validator does catch a mistake (so a pass above means something).
    _, deployment = next(deployments())
    broken = copy.deepcopy(deployment)
    broken["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPortt"] = 1
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, version, strict=True)


def test_the_kustomization_applies_every_manifest_but_the_example_secret() -> None:
    kustomization = yaml.safe_load((KUBERNETES / "kustomization.yaml").read_text())
    files = {p.name for p in KUBERNETES.glob("*.yaml")} - {"kustomization.yaml", "secret.example.yaml"}
    assert set(kustomization["resources"]) == files
    assert kustomization["namespace"] == "clm"


async def test_one_deployment_and_service_per_clm_service_on_its_own_port_and_probes() -> None:
    found = dict(deployments())
    assert set(found) == set(SETTINGS)
    services = {d["metadata"]["name"]: d for _, d in manifests() if d["kind"] == "Service"}
    for module, deployment in found.items():
        port = SETTINGS[module]().port
        pod = deployment["spec"]["template"]
        container = pod["spec"]["containers"][0]
        assert container["ports"] == [{"name": "http", "containerPort": port}]
        assert {"name": "CLM_PORT", "value": str(port)} in container["env"]
        assert pod["metadata"]["annotations"]["prometheus.io/port"] == str(port)
        assert deployment["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
        service = services[deployment["metadata"]["name"]]
        assert service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]
        assert service["spec"]["ports"][0]["port"] == port
        # The probes and the scrape path are routes the service serves (not started here: alive,
        # not ready).
        paths = [container[p]["httpGet"]["path"] for p in ("startupProbe", "livenessProbe")]
        answers = await answers_of(APPS[module](SETTINGS[module]()), [*paths, "/readyz", "/metrics"])
        assert answers == [200, 200, 503, 200], module
        assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
        assert pod["metadata"]["annotations"]["prometheus.io/path"] == "/metrics"
        # Long enough for the shutdown the service does on SIGTERM (uvicorn drains for 20 s).
        assert pod["spec"]["terminationGracePeriodSeconds"] >= 30
        refs = {next(iter(ref.values()))["name"] for ref in container["envFrom"]}
        assert refs == {"clm-config", "clm-secrets"}


def test_ingest_keeps_serving_until_its_endpoints_are_gone() -> None:
    """Upstream systems post to ingest through its Service: a pod that stops listening on SIGTERM
    would refuse the connections proxies send until they learn the endpoint is gone."""
    (deployment,) = [d for module, d in deployments() if module == "ingest"]
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    command = container["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep" and 0 < int(command[1]) < 30


def test_every_service_rolls_out_a_new_pod_before_stopping_an_old_one() -> None:
    """docs/deploy.md's upgrades rely on it: old and new replicas side by side, never fewer ready.
    Set explicitly: Kubernetes' default (25%, rounded down) is 0 only up to three replicas."""
    found = dict(deployments())
    assert set(found) == set(SETTINGS)
    for module, deployment in found.items():
        strategy = deployment["spec"]["strategy"]
        assert strategy.get("type", "RollingUpdate") == "RollingUpdate", module
        assert strategy["rollingUpdate"]["maxUnavailable"] == 0, module
        assert strategy["rollingUpdate"].get("maxSurge", 1) != 0, module


def test_every_variable_the_manifests_set_is_read_by_a_service_that_gets_it() -> None:
    everyone = set().union(*(env_names(cls) for cls in SETTINGS.values()))
    given = set(config_map()) | set(example_secret())
    unknown = (given | set(commented("config.yaml")) | set(commented("secret.example.yaml"))) - everyone
    assert not unknown, f"no service reads {sorted(unknown)}"
    for module, deployment in deployments():
        for var in deployment["spec"]["template"]["spec"]["containers"][0].get("env", []):
            assert var["name"] in env_names(SETTINGS[module]), (module, var["name"])


def test_the_example_secret_holds_every_production_secret_and_starts_nothing_unchanged(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    required = {"DATABASE_URL"} | {
        f"CLM_{name.upper()}" for cls in SETTINGS.values() for name in cls.production_secrets
    }
    assert required <= set(example_secret())
    for key, value in {**config_map(), **example_secret()}.items():
        monkeypatch.setenv(key, value)
    for module, cls in SETTINGS.items():
        try:
            settings = cls()
        except ValidationError:
            continue  # refused at start as well (the notifier's empty webhook secret)
        assert settings.environment == "production", module
        assert settings.insecure_settings(), f"{module} would start with the example secret"


# Secrets with a development default that only authenticate CLM to a provider: a default one fails
# sends, it admits nobody.
OUTBOUND_ONLY_SECRETS = {"fcm_bearer_token"}


def test_every_secret_whose_default_is_public_is_in_the_example_secret() -> None:
    """A secret setting with a development default (in this repository) that a service trusts is
    replaced by the example secret, whether or not `insecure_settings` checks it: the notifier
    verifies inbound Twilio requests with CLM_TWILIO_AUTH_TOKEN."""
    for module, cls in SETTINGS.items():
        for name, field in cls.model_fields.items():
            default = field.default
            if not isinstance(default, SecretStr) or not default.get_secret_value():
                continue
            if name not in OUTBOUND_ONLY_SECRETS:
                assert f"CLM_{name.upper()}" in example_secret(), (module, name)


# Strong values for every key of the example secret.
STRONG = {
    "DATABASE_URL": "postgresql://clm:pw@db:5432/clm",
    "CLM_ADMIN_TOKEN": "t" * 64,
    "CLM_PRIVACY_SALT": "s" * 64,
    "CLM_LINK_SECRET": "l" * 64,
    "CLM_WEBHOOK_SECRET": "whsec_" + "QUJD" * 8,
    "CLM_WRITE_KEYS": "w" * 48,
    "CLM_SMTP_PASSWORD": "p" * 20,
    "CLM_TWILIO_AUTH_TOKEN": "a" * 32,
}


def test_the_config_with_real_secrets_is_a_valid_production_setup(monkeypatch: pytest.MonkeyPatch) -> None:
    assert set(STRONG) == set(example_secret())
    for key, value in {**config_map(), **STRONG}.items():
        monkeypatch.setenv(key, value)
    for module, cls in SETTINGS.items():
        settings = cls()
        assert settings.insecure_settings() == [], module
        assert settings.topic_replication_factor == 3
        # An in-cluster broker in plaintext, the default: the example starts against one as it is.
        assert settings.kafka_security_protocol == "PLAINTEXT"
        assert settings.kafka_bootstrap_servers == config_map()["KAFKA_BOOTSTRAP_SERVERS"]


def test_the_commented_sasl_ssl_block_uncommented_is_a_valid_production_setup(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    for key, value in {**config_map(), **STRONG, **kafka_sasl_ssl(tmp_path / "ca.crt")}.items():
        monkeypatch.setenv(key, value)
    # Without the secret's Kafka password (still commented there), refused as it loads, by name.
    with pytest.raises(ValidationError, match=r"SASL_SSL: set CLM_KAFKA_SASL_PASSWORD \["):
        BaseServiceSettings()
    monkeypatch.setenv("CLM_KAFKA_SASL_PASSWORD", "k" * 32)
    for module, cls in SETTINGS.items():
        settings = cls()
        assert settings.insecure_settings() == [], module
        assert settings.kafka_security_protocol == "SASL_SSL"
        assert settings.kafka_sasl_mechanism == "SCRAM-SHA-512"
        assert settings.kafka_ssl_ca_file == tmp_path / "ca.crt"


def test_docker_compose_runs_each_service_with_settings_it_reads() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    everyone = set().union(*(env_names(cls) for cls in SETTINGS.values()))
    ran = set()
    for name, service in compose["services"].items():
        command = service.get("command", [])
        if command[:2] != ["python", "-m"] or not command[2].startswith("services."):
            continue
        module = command[2].removeprefix("services.")
        ran.add(module)
        # One environment block is shared by the four (as the ConfigMap is): each variable must be
        # read by some service.
        unknown = set(service["environment"]) - everyone
        assert not unknown, f"{name}: no service reads {sorted(unknown)}"
        port = SETTINGS[module]().port
        assert service["environment"]["CLM_PORT"] == str(port)
        assert service["ports"] == [f"127.0.0.1:{port}:{port}"]
        assert "/readyz" in service["healthcheck"]["test"][1]
    assert ran == set(SETTINGS)
