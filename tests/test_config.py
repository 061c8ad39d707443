"""Settings from the environment: names from the contract, closed by default, clear errors."""

from __future__ import annotations

import hashlib
import ipaddress
from xml.etree import ElementTree

import pytest

from config import DEFAULT_ACTIVE_CALL_XML, DEFAULT_DATABASE_URL, ConfigError, Settings, key_digest


def test_defaults() -> None:
    settings = Settings.from_env({})
    assert settings.database_url == DEFAULT_DATABASE_URL
    assert settings.database_url.startswith("sqlite:///") and "/instance/" in settings.database_url
    assert settings.redis_url == "redis://localhost:6379/0"
    assert settings.broker_url == settings.redis_url
    assert (settings.max_content_length, settings.dedup_ttl_seconds, settings.pending_redelivery_seconds) == (
        65536, 86400, 60)
    assert (settings.log_level, settings.log_format) == ("INFO", "json")
    assert settings.webhook_signature_header == "X-Webhook-Signature"
    assert settings.api_key_digests == () and settings.webhook_secrets == () and settings.webhook_tokens == ()


def test_every_variable_is_read() -> None:
    digest = hashlib.sha256(b"two").hexdigest()
    settings = Settings.from_env({
        "DATABASE_URL": "postgresql+psycopg://u@h/db",
        "REDIS_URL": "redis://r:6379/1",
        "CELERY_BROKER_URL": "amqp://guest:guest@127.0.0.1:5672//",
        "API_KEYS": f"one, sha256:{digest}",
        "WEBHOOK_SECRETS": "s1,s2",
        "WEBHOOK_SIGNATURE_HEADER": "X-Sig",
        "WEBHOOK_TOKENS": "t1",
        "WEBHOOK_ALLOWED_IPS": "52.47.190.220, 3.127.102.0/24",
        "TRUSTED_PROXY_COUNT": "1",
        "MAX_CONTENT_LENGTH": "2048",
        "DEDUP_TTL_SECONDS": "3600",
        "PENDING_REDELIVERY_SECONDS": "30",
        "LOG_LEVEL": "debug",
        "LOG_FORMAT": "console",
    })
    assert settings.broker_url == "amqp://guest:guest@127.0.0.1:5672//"
    assert settings.api_key_digests == (key_digest("one"), bytes.fromhex(digest))
    assert settings.webhook_secrets == ("s1", "s2")
    assert settings.webhook_allowed_ips == (
        ipaddress.ip_network("52.47.190.220/32"), ipaddress.ip_network("3.127.102.0/24"))
    assert (settings.trusted_proxy_count, settings.max_content_length) == (1, 2048)
    assert (settings.dedup_ttl_seconds, settings.pending_redelivery_seconds) == (3600, 30)
    assert (settings.log_level, settings.log_format) == ("DEBUG", "console")


def test_a_worker_takes_its_batch_ahead_on_redis_and_one_message_on_rabbitmq() -> None:
    from app.celery_app import celery_config

    assert Settings.from_env({}).worker_batch_size == 50
    on_redis = Settings.from_env({"WORKER_BATCH_SIZE": "20"})
    assert celery_config(on_redis)["worker_prefetch_multiplier"] == 20
    on_rabbitmq = Settings.from_env({"WORKER_BATCH_SIZE": "20", "CELERY_BROKER_URL": "amqp://guest:guest@127.0.0.1//"})
    assert celery_config(on_rabbitmq)["worker_prefetch_multiplier"] == 1


def test_secrets_are_not_in_the_repr() -> None:
    settings = Settings.from_env({"API_KEYS": "k-secret", "WEBHOOK_SECRETS": "s-secret", "WEBHOOK_TOKENS": "t-secret"})
    text = repr(settings)
    assert "secret" not in text


@pytest.mark.parametrize(
    ("env", "names"),
    [
        ({"APP_ENV": "production"}, "WEBHOOK_SECRETS"),
        ({"WEBHOOK_ALLOWED_IPS": "not-an-ip"}, "WEBHOOK_ALLOWED_IPS"),
        ({"API_KEYS": "sha256:abc"}, "API_KEYS"),
        ({"MAX_CONTENT_LENGTH": "big"}, "MAX_CONTENT_LENGTH"),
        ({"DEDUP_TTL_SECONDS": "1"}, "DEDUP_TTL_SECONDS"),
        ({"LOG_FORMAT": "xml"}, "LOG_FORMAT"),
        ({"WEBHOOK_AUTH": "maybe"}, "WEBHOOK_AUTH"),
        ({"WORKER_BATCH_SIZE": "0"}, "WORKER_BATCH_SIZE"),
        ({"WORKER_BATCH_SIZE": "501"}, "WORKER_BATCH_SIZE"),
    ],
)
def test_bad_settings_name_the_variable(env: dict, names: str) -> None:
    with pytest.raises(ConfigError) as caught:
        Settings.from_env(env)
    assert names in str(caught.value)


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"APP_ENV": "production", "WEBHOOK_TOKENS": "t"},
         {"webhook_tokens": ("t",), "webhook_auth_configured": True}),
        ({"APP_ENV": "production", "WEBHOOK_SECRETS": "s"},
         {"webhook_secrets": ("s",), "webhook_auth_configured": True}),
        ({"APP_ENV": "production", "WEBHOOK_AUTH": "none"},
         {"webhook_auth": "none", "webhook_auth_configured": False}),
    ],
)
def test_production_starts_with_auth_or_an_explicit_none(env: dict, expected: dict) -> None:
    """It starts, and with the authentication that let it start: the one the environment gave."""
    settings = Settings.from_env(env)
    assert settings.app_env == "production"
    assert {name: getattr(settings, name) for name in expected} == expected


def test_default_call_xml_is_well_formed_with_a_response_root() -> None:
    """The settings check skips parsing the default, so this is where it is checked."""
    assert ElementTree.fromstring(DEFAULT_ACTIVE_CALL_XML).tag == "Response"  # noqa: S314 - our constant


@pytest.mark.parametrize(("document", "message"), [
    ("<Response><Say>hi</Response>", "not well-formed"),
    ('<?xml version="1.0"?><Say>hi</Say>', "<Response> root"),
])
def test_call_xml_of_the_operator_is_checked(document: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        Settings.from_env({"VOICE_ACTIVE_CALL_XML": document})
    custom = '<?xml version="1.0"?><Response><Say>Please hold</Say></Response>'
    assert Settings.from_env({"VOICE_ACTIVE_CALL_XML": custom}).voice_active_call_xml == custom


# --- a Redis Cluster as the dedup cache -------------------------------------------------------

CLUSTER_URL = "redis+cluster://127.0.0.1:7000,127.0.0.1:7001"
RABBITMQ = "amqp://guest:guest@127.0.0.1:5672//"


def test_a_cluster_url_holds_the_cache_with_rabbitmq_as_the_broker() -> None:
    from config import parse_cluster_url

    settings = Settings.from_env({"REDIS_URL": CLUSTER_URL, "CELERY_BROKER_URL": RABBITMQ})
    assert settings.redis_is_cluster and not settings.redis_is_sentinel and not settings.broker_is_redis
    assert parse_cluster_url(settings.redis_url).nodes == (("127.0.0.1", 7000), ("127.0.0.1", 7001))
    with_auth = parse_cluster_url("redis+cluster://cache:s%40cret@h1:7000,h2/0")
    assert with_auth.nodes == (("h1", 7000), ("h2", 6379))
    assert (with_auth.username, with_auth.password) == ("cache", "s@cret")
    assert "s@cret" not in repr(with_auth)
    assert not Settings.from_env({}).redis_is_cluster


@pytest.mark.parametrize("broker", ["", "redis://127.0.0.1:6379/0", "sentinel://127.0.0.1:26379/0"])
def test_a_cluster_is_refused_while_redis_is_the_broker(broker: str) -> None:
    env = {"REDIS_URL": CLUSTER_URL, **({"CELERY_BROKER_URL": broker} if broker else {})}
    with pytest.raises(ConfigError, match=r"needs one Redis \(a Sentinel group for failover\).*RabbitMQ"):
        Settings.from_env(env)


def test_a_cluster_is_refused_as_the_broker() -> None:
    with pytest.raises(ConfigError, match="CELERY_BROKER_URL cannot be a Redis Cluster"):
        Settings.from_env({"CELERY_BROKER_URL": CLUSTER_URL})
    with pytest.raises(ConfigError, match="CELERY_BROKER_URL cannot be a Redis Cluster"):
        Settings(redis_url=CLUSTER_URL, celery_broker_url=CLUSTER_URL).check()


def test_min_replicas_is_refused_with_a_cluster() -> None:
    """REDIS_MIN_REPLICAS is the Redis broker's WAIT; with a cluster cache the broker is RabbitMQ."""
    with pytest.raises(ConfigError, match="REDIS_MIN_REPLICAS applies to the Redis broker"):
        Settings.from_env({"REDIS_URL": CLUSTER_URL, "CELERY_BROKER_URL": RABBITMQ, "REDIS_MIN_REPLICAS": "1"})


@pytest.mark.parametrize(("url", "message"), [
    ("redis+cluster://127.0.0.1:7000/1", "database 0 only"),
    ("redis+cluster://127.0.0.1:x", "port that is not a number"),
    ("redis+cluster://", "names no cluster node"),
    ("redis+cluster://:7000", "without a host"),
])
def test_bad_cluster_urls_name_the_variable(url: str, message: str) -> None:
    with pytest.raises(ConfigError, match=f"REDIS_URL.*{message}"):
        Settings.from_env({"REDIS_URL": url, "CELERY_BROKER_URL": RABBITMQ})


@pytest.mark.parametrize(("url", "message"), [
    ("sentinel://127.0.0.1:x/0", "a sentinel with a port that is not a number"),
    ("sentinel://:26379/0", "a sentinel without a host"),
    ("sentinel://127.0.0.1:26379/x", "must end with a database number"),
])
def test_bad_sentinel_urls_name_the_variable(url: str, message: str) -> None:
    with pytest.raises(ConfigError, match=f"REDIS_URL.*{message}"):
        Settings.from_env({"REDIS_URL": url})
