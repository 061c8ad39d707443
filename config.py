"""Service settings, read from the environment once into a typed, immutable object.

Tests build :class:`Settings` directly instead of touching ``os.environ``. No secret has a
fallback value: an unset secret is empty, and what an empty secret means (closed, not open)
is decided where it is used.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import ipaddress
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import SplitResult, unquote, urlsplit

INSTANCE_DIR = Path(__file__).resolve().parent / "instance"
DEFAULT_DATABASE_URL = f"sqlite:///{INSTANCE_DIR / 'voice.db'}"
DEFAULT_REDIS_URL = "redis://localhost:6379/0"
REDIS_BROKER_SCHEMES = ("redis://", "rediss://", "unix://", "sentinel://")
# Broker URLs the project's transport (app.plumbing.transport) serves: it writes the pending entry with
# the message, and waits for replicas when REDIS_MIN_REPLICAS asks it to.
HOLDING_BROKER_SCHEMES = ("redis://", "sentinel://")
SENTINEL_SCHEME = "sentinel://"
# A Redis Cluster's startup nodes: it can hold the dedup cache (RabbitMQ as the broker), never the
# broker (kombu's Redis transport reads several keys of its own together, which a cluster spreads).
CLUSTER_SCHEME = "redis+cluster://"
QUEUE_TYPES = ("classic", "quorum")

# What a live call's request (isActive=1) is answered with: AT's call-control document.
DEFAULT_ACTIVE_CALL_XML = '<?xml version="1.0" encoding="UTF-8"?><Response/>'

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True)
class SentinelURL:
    """``sentinel://h1:26379;sentinel://h2:26379/0``: the sentinels to ask for the master, the
    database number, and the master's credentials (written on any one of the parts, as kombu
    reads them)."""

    sentinels: tuple[tuple[str, int], ...]
    db: int = 0
    username: str | None = field(default=None, repr=False)
    password: str | None = field(default=None, repr=False)


def _host_port(parsed: SplitResult, default_port: int, what: str) -> tuple[str, int]:
    """One server of a multi-server URL; ``what`` starts the error ("REDIS_URL has a sentinel")."""
    try:
        port = parsed.port or default_port
    except ValueError:
        raise ConfigError(f"{what} with a port that is not a number") from None
    if not parsed.hostname:
        raise ConfigError(f"{what} without a host")
    return parsed.hostname, port


def parse_sentinel_url(url: str, name: str = "REDIS_URL") -> SentinelURL:
    """The parts of a Sentinel URL; ``name`` is the variable an error names."""
    sentinels: list[tuple[str, int]] = []
    db, username, password = 0, None, None
    for part in (p.strip() for p in url.split(";")):
        if not part:
            continue
        if not part.startswith(SENTINEL_SCHEME):
            raise ConfigError(f"{name} mixes sentinel:// with another scheme: every part must be sentinel://host:port")
        parsed = urlsplit(part)
        sentinels.append(_host_port(parsed, 26379, f"{name} has a sentinel"))
        path = parsed.path.strip("/")
        if path:
            if not path.isdigit():
                raise ConfigError(f"{name} must end with a database number (/0), got /{path}")
            db = int(path)
        username = username or parsed.username or None
        password = password or parsed.password or None
    if not sentinels:
        raise ConfigError(f"{name} names no sentinel")
    return SentinelURL(tuple(sentinels), db, username, password)


@dataclass(frozen=True)
class ClusterURL:
    """``redis+cluster://[user:pass@]h1:7000,h2:7001``: the nodes to learn the cluster's layout
    from (any one that answers will do), and the credentials every node takes."""

    nodes: tuple[tuple[str, int], ...]
    username: str | None = field(default=None, repr=False)
    password: str | None = field(default=None, repr=False)


def parse_cluster_url(url: str, name: str = "REDIS_URL") -> ClusterURL:
    """The parts of a cluster URL; ``name`` is the variable an error names. A cluster has one
    database, 0, so no other number is taken."""
    if not url.startswith(CLUSTER_SCHEME):
        raise ConfigError(f"{name} must start with {CLUSTER_SCHEME}")
    netloc, _, path = url[len(CLUSTER_SCHEME):].partition("/")
    if path.strip("/") not in {"", "0"}:
        raise ConfigError(f"{name} names a Redis Cluster, which has database 0 only, got /{path}")
    userinfo, _, hosts = netloc.rpartition("@")
    username, _, password = userinfo.partition(":")
    nodes: list[tuple[str, int]] = []
    for part in (p.strip() for p in hosts.split(",")):
        if not part:
            continue
        nodes.append(_host_port(urlsplit(f"//{part}"), 6379, f"{name} has a cluster node"))
    if not nodes:
        raise ConfigError(f"{name} names no cluster node (redis+cluster://host:port[,host:port...])")
    return ClusterURL(tuple(nodes), unquote(username) or None, unquote(password) or None)


class ConfigError(ValueError):
    """A setting is missing or malformed; the message names the variable."""


def _split(value: str | None) -> tuple[str, ...]:
    return tuple(part.strip() for part in (value or "").split(",") if part.strip())


def _int(env: Mapping[str, str], name: str, default: int, low: int, high: int) -> int:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{name} must be an integer, got {raw!r}") from None
    if not low <= value <= high:
        raise ConfigError(f"{name} must be between {low} and {high}, got {value}")
    return value


def key_digest(key: str) -> bytes:
    """The SHA-256 digest API keys are compared by, so plain and hashed entries compare alike."""
    return hashlib.sha256(key.encode()).digest()


def _api_key_digests(raw: str | None) -> tuple[bytes, ...]:
    digests = []
    for entry in _split(raw):
        if entry.startswith("sha256:"):
            hexpart = entry.removeprefix("sha256:")
            try:
                digest = bytes.fromhex(hexpart)
            except ValueError:
                digest = b""
            if len(digest) != 32:
                raise ConfigError("API_KEYS has a sha256: entry that is not 64 hex digits")
            digests.append(digest)
        else:
            digests.append(key_digest(entry))
    return tuple(digests)


def _standard_webhook_keys(secrets: tuple[str, ...]) -> tuple[bytes, ...]:
    """The keys of ``whsec_<base64>`` secrets (the Standard Webhooks form)."""
    keys = []
    for secret in secrets:
        if secret.startswith("whsec_"):
            try:
                keys.append(base64.b64decode(secret.removeprefix("whsec_"), validate=True))
            except (binascii.Error, ValueError):
                raise ConfigError("WEBHOOK_SECRETS has a whsec_ entry that is not valid base64") from None
    return tuple(keys)


def _check_call_xml(document: str) -> None:
    """The operator's own call-control XML must be well formed, with a <Response> root."""
    if document == DEFAULT_ACTIVE_CALL_XML:
        return  # valid (tests/test_config.py); no process loads the XML parser for it
    from xml.etree import ElementTree

    try:
        root = ElementTree.fromstring(document)  # noqa: S314 - the operator's setting, not client input
    except ElementTree.ParseError as exc:
        raise ConfigError(f"VOICE_ACTIVE_CALL_XML is not well-formed XML: {exc}") from None
    if root.tag != "Response":
        raise ConfigError(f"VOICE_ACTIVE_CALL_XML must have a <Response> root, not <{root.tag}>")


# A Celery task or queue name as a consumer's code would register it (dotted words, no spaces).
_TASK_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.:-]{0,199}$")
_QUEUE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,199}$")
MIN_RETENTION_DAYS = 7


def _check_hook(task: str, queue: str) -> None:
    if task and not _TASK_NAME.match(task):
        raise ConfigError(f"VOICE_HOOK_TASK must be a Celery task name such as crm.tasks.recording_ready, got {task!r}")
    if not _QUEUE_NAME.match(queue):
        raise ConfigError(f"VOICE_HOOK_QUEUE must be a queue name (letters, digits, _.:-), got {queue!r}")


def check_retention_days(days: int, dedup_ttl_seconds: int, name: str) -> None:
    """0 keeps events forever; any other window must outlast the dedup key, or a late retry of a
    pruned event could no longer be told from a new one (neither Redis nor the database knows it)."""
    if days == 0:
        return
    floor = max(MIN_RETENTION_DAYS, -(-dedup_ttl_seconds // 86400))
    if days < floor:
        raise ConfigError(
            f"{name} must be 0 (keep forever) or at least {floor} days (7, and no shorter than "
            f"DEDUP_TTL_SECONDS={dedup_ttl_seconds}), got {days}"
        )


def _networks(raw: str | None) -> tuple[IPNetwork, ...]:
    networks = []
    for entry in _split(raw):
        try:
            networks.append(ipaddress.ip_network(entry, strict=False))
        except ValueError:
            raise ConfigError(
                f"WEBHOOK_ALLOWED_IPS has an entry that is not an address or CIDR range: {entry!r}"
            ) from None
    return tuple(networks)


CLUSTER_NOT_A_BROKER = (
    "the Redis broker (kombu) needs one Redis (a Sentinel group for failover); a Redis Cluster can "
    "hold the dedup cache only, with RabbitMQ as the broker (CELERY_BROKER_URL=amqp://...)"
)


def _check_cluster(settings: Settings) -> None:
    """A cluster URL only as the cache's: the broker's transport keeps each queue, its unacked hash
    and their index in keys it reads together, and a cluster spreads those over its nodes."""
    if settings.celery_broker_url.startswith(CLUSTER_SCHEME):
        raise ConfigError(f"CELERY_BROKER_URL cannot be a Redis Cluster: {CLUSTER_NOT_A_BROKER}")
    if not settings.redis_is_cluster:
        return
    parse_cluster_url(settings.redis_url)
    if not settings.celery_broker_url or settings.broker_is_redis:
        raise ConfigError(f"REDIS_URL names a Redis Cluster while Redis is the broker: {CLUSTER_NOT_A_BROKER}")
    if settings.redis_min_replicas:
        raise ConfigError(
            "REDIS_MIN_REPLICAS applies to the Redis broker's write only; with a Redis Cluster as the "
            "dedup cache RabbitMQ is the broker, and its publisher confirms are the guarantee"
        )


@dataclass(frozen=True)
class Settings:
    """Everything the service reads from its environment. Field names follow the variables."""

    database_url: str = DEFAULT_DATABASE_URL
    redis_url: str = DEFAULT_REDIS_URL
    celery_broker_url: str = ""
    api_key_digests: tuple[bytes, ...] = field(default=(), repr=False)
    webhook_secrets: tuple[str, ...] = field(default=(), repr=False)
    webhook_signature_header: str = "X-Webhook-Signature"
    webhook_tokens: tuple[str, ...] = field(default=(), repr=False)
    webhook_allowed_ips: tuple[IPNetwork, ...] = ()
    webhook_auth: str = ""
    trusted_proxy_count: int = 0
    max_content_length: int = 65536
    dedup_ttl_seconds: int = 86400
    pending_redelivery_seconds: int = 60
    voice_active_call_xml: str = DEFAULT_ACTIVE_CALL_XML
    event_max_retries: int = 14
    worker_metrics_port: int = 9808
    # New events a worker process applies in one transaction at most (1: one at a time), and so
    # the messages it takes from the broker ahead of applying them (its prefetch).
    worker_batch_size: int = 50
    voice_hook_task: str = ""
    voice_hook_queue: str = "voice-hooks"
    event_retention_days: int = 0
    log_level: str = "INFO"
    log_format: str = "json"
    app_env: str = "development"
    # How long one Redis or broker call on the webhook's path may take before the request is
    # answered 503: AT must get its answer within a second even when Redis hangs.
    redis_socket_timeout: float = 0.25
    celery_queue_type: str = "classic"
    redis_sentinel_master: str = "mymaster"
    redis_min_replicas: int = 0
    redis_replica_timeout_ms: int = 200

    @property
    def broker_url(self) -> str:
        return self.celery_broker_url or self.redis_url

    @property
    def broker_is_redis(self) -> bool:
        """Redis is the broker (else RabbitMQ, and Redis is only the dedup cache)."""
        return self.broker_url.startswith(REDIS_BROKER_SCHEMES)

    @property
    def broker_transport_holds_pending(self) -> bool:
        """The project's transport (``app.plumbing.transport``) serves this broker URL and writes the
        pending entry with the message; other Redis URLs hold it in a round trip of its own. So
        does a broker on another Redis than REDIS_URL's: the worker and the sweeper keep the
        pending set on REDIS_URL's server, where the broker's script cannot write."""
        return self.broker_url.startswith(HOLDING_BROKER_SCHEMES) and self.broker_url == self.redis_url

    @property
    def sweep_interval_seconds(self) -> float:
        """How often beat sends the sweeper: a quarter of the redelivery age, at least 5 s."""
        return max(5.0, self.pending_redelivery_seconds / 4)

    @property
    def redis_is_sentinel(self) -> bool:
        return self.redis_url.startswith(SENTINEL_SCHEME)

    @property
    def redis_is_cluster(self) -> bool:
        return self.redis_url.startswith(CLUSTER_SCHEME)

    @property
    def broker_is_sentinel(self) -> bool:
        return self.broker_url.startswith(SENTINEL_SCHEME)

    @property
    def hmac_secrets(self) -> tuple[str, ...]:
        """Secrets for the hex HMAC header (every entry that is not in whsec_ form)."""
        return tuple(secret for secret in self.webhook_secrets if not secret.startswith("whsec_"))

    @property
    def standard_webhook_keys(self) -> tuple[bytes, ...]:
        return _standard_webhook_keys(self.webhook_secrets)

    @property
    def webhook_auth_configured(self) -> bool:
        return bool(self.webhook_secrets or self.webhook_tokens)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if env is None else env
        log_format = env.get("LOG_FORMAT", "json").strip().lower() or "json"
        if log_format not in {"json", "console"}:
            raise ConfigError(f"LOG_FORMAT must be json or console, got {log_format!r}")
        log_level = env.get("LOG_LEVEL", "INFO").strip().upper() or "INFO"
        if log_level not in {"DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"}:
            raise ConfigError(f"LOG_LEVEL must be a logging level name, got {log_level!r}")
        settings = cls(
            database_url=env.get("DATABASE_URL", "").strip() or DEFAULT_DATABASE_URL,
            redis_url=env.get("REDIS_URL", "").strip() or DEFAULT_REDIS_URL,
            celery_broker_url=env.get("CELERY_BROKER_URL", "").strip(),
            api_key_digests=_api_key_digests(env.get("API_KEYS")),
            webhook_secrets=_split(env.get("WEBHOOK_SECRETS")),
            webhook_signature_header=env.get("WEBHOOK_SIGNATURE_HEADER", "").strip() or "X-Webhook-Signature",
            webhook_tokens=_split(env.get("WEBHOOK_TOKENS")),
            webhook_allowed_ips=_networks(env.get("WEBHOOK_ALLOWED_IPS")),
            webhook_auth=env.get("WEBHOOK_AUTH", "").strip().lower(),
            trusted_proxy_count=_int(env, "TRUSTED_PROXY_COUNT", 0, 0, 10),
            max_content_length=_int(env, "MAX_CONTENT_LENGTH", 65536, 1024, 10 * 1024 * 1024),
            dedup_ttl_seconds=_int(env, "DEDUP_TTL_SECONDS", 86400, 60, 90 * 86400),
            pending_redelivery_seconds=_int(env, "PENDING_REDELIVERY_SECONDS", 60, 5, 86400),
            voice_active_call_xml=env.get("VOICE_ACTIVE_CALL_XML", "").strip() or DEFAULT_ACTIVE_CALL_XML,
            event_max_retries=_int(env, "EVENT_MAX_RETRIES", 14, 0, 100),
            worker_metrics_port=_int(env, "WORKER_METRICS_PORT", 9808, 0, 65535),
            worker_batch_size=_int(env, "WORKER_BATCH_SIZE", 50, 1, 500),
            voice_hook_task=env.get("VOICE_HOOK_TASK", "").strip(),
            voice_hook_queue=env.get("VOICE_HOOK_QUEUE", "").strip() or "voice-hooks",
            event_retention_days=_int(env, "EVENT_RETENTION_DAYS", 0, 0, 36500),
            log_level=log_level,
            log_format=log_format,
            app_env=env.get("APP_ENV", "development").strip().lower() or "development",
            celery_queue_type=env.get("CELERY_QUEUE_TYPE", "").strip().lower() or "classic",
            redis_sentinel_master=env.get("REDIS_SENTINEL_MASTER", "").strip() or "mymaster",
            redis_min_replicas=_int(env, "REDIS_MIN_REPLICAS", 0, 0, 16),
            # The wait is part of the webhook's answer, which must come within a second.
            redis_replica_timeout_ms=_int(env, "REDIS_REPLICA_TIMEOUT_MS", 200, 1, 500),
        )
        settings.check()
        return settings

    def check(self) -> None:
        """Refuse settings that would run the service open where it must be closed."""
        _standard_webhook_keys(self.webhook_secrets)
        _check_call_xml(self.voice_active_call_xml)
        if self.celery_queue_type not in QUEUE_TYPES:
            raise ConfigError(f"CELERY_QUEUE_TYPE must be classic or quorum, got {self.celery_queue_type!r}")
        if self.celery_queue_type == "quorum" and self.broker_is_redis:
            raise ConfigError("CELERY_QUEUE_TYPE=quorum needs RabbitMQ as the broker (CELERY_BROKER_URL=amqp://...)")
        for name, url in (("REDIS_URL", self.redis_url), ("CELERY_BROKER_URL", self.celery_broker_url)):
            if url.startswith(SENTINEL_SCHEME):
                parse_sentinel_url(url, name)
        _check_cluster(self)
        master = self.redis_sentinel_master
        if not master or any(ch.isspace() for ch in master):
            raise ConfigError(f"REDIS_SENTINEL_MASTER must be a name without spaces, got {master!r}")
        if self.redis_min_replicas and not self.broker_transport_holds_pending:
            raise ConfigError(
                "REDIS_MIN_REPLICAS applies to the Redis broker's write (redis:// or sentinel://, the "
                "same Redis as REDIS_URL); on RabbitMQ the broker's publisher confirms are the "
                "guarantee, and rediss://, unix:// and separate Redis brokers cannot wait for replicas"
            )
        _check_hook(self.voice_hook_task, self.voice_hook_queue)
        check_retention_days(self.event_retention_days, self.dedup_ttl_seconds, "EVENT_RETENTION_DAYS")
        if self.webhook_auth not in {"", "none"}:
            raise ConfigError(f"WEBHOOK_AUTH may only be 'none' (or unset), got {self.webhook_auth!r}")
        if self.app_env == "production" and not self.webhook_auth_configured and self.webhook_auth != "none":
            raise ConfigError(
                "APP_ENV=production needs webhook authentication: set WEBHOOK_SECRETS or WEBHOOK_TOKENS, "
                "or WEBHOOK_AUTH=none to run without it on purpose"
            )
