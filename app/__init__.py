"""The voice webhook service: a Flask application factory."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
from flask import Flask, Response, g, request
from sqlalchemy import event
from sqlalchemy.engine import Engine, make_url
from werkzeug.middleware.proxy_fix import ProxyFix

from app.base.errors import register_errorhandlers
from app.base.extensions import db
from app.base.logs import REQUEST_ID_HEADER, configure_logging, request_id_of
from app.celery_app import celery_config, celery_init_app
from app.plumbing.redis_clients import redis_client
from config import INSTANCE_DIR, ConfigError, Settings

if TYPE_CHECKING:
    import sqlite3

MIGRATIONS_DIR = str(Path(__file__).resolve().parent.parent / "migrations")


WEB = "web"
WORKER = "worker"


def create_app(settings: Settings | None = None, role: str = WEB) -> Flask:
    """Build the app from settings (read from the environment when none are given).

    ``role="worker"`` builds what Celery's processes (worker, beat, Flower) use: the database,
    Redis and Celery, without the blueprints, the OpenAPI document, the error handlers, the request
    hooks and the ``flask`` commands, whose modules no task imports; every worker process would
    hold them in memory for nothing (``bench/worker_memory.py`` measures it).
    """
    if role not in {WEB, WORKER}:
        raise ValueError(f"role must be {WEB!r} or {WORKER!r}, got {role!r}")
    if settings is None:
        try:
            settings = Settings.from_env()
        except ConfigError as exc:
            raise SystemExit(f"voice webhook service cannot start: {exc}") from None
    configure_logging(settings.log_level, settings.log_format)
    app = Flask(__name__, instance_path=str(INSTANCE_DIR), static_folder=None)
    app.config.from_mapping(
        SQLALCHEMY_DATABASE_URI=settings.database_url,
        SQLALCHEMY_ENGINE_OPTIONS=engine_options(settings.database_url),
        MAX_CONTENT_LENGTH=settings.max_content_length,
        CELERY=celery_config(settings),
    )
    app.json.sort_keys = False  # type: ignore[attr-defined]
    app.extensions["settings"] = settings
    register_extensions(app, settings)
    if role == WEB:
        register_blueprints(app)
        register_errorhandlers(app)
        register_commands(app)
        register_request_hooks(app, settings)
    return app


def engine_options(database_url: str) -> dict[str, Any]:
    """Connection settings per database: fail fast on a dead server, never hang a worker."""
    url = make_url(database_url)
    if url.get_backend_name() == "sqlite":
        if url.database and url.database != ":memory:":
            Path(url.database).parent.mkdir(parents=True, exist_ok=True)
        return {"connect_args": {"timeout": 15}}
    return {
        "pool_pre_ping": True,
        "pool_recycle": 1800,
        "connect_args": {
            "connect_timeout": 5,
            # A lock wait or a query longer than these is a transient failure the task retries.
            "options": "-c lock_timeout=5000 -c statement_timeout=10000",
            # A server that stopped answering (its host cut off: no reset ever comes) fails the
            # call after this long instead of hanging it for the kernel's retransmission limit
            # (many minutes). The worker's solo processes have no task time limit to do it.
            "tcp_user_timeout": 12000,
            "keepalives": 1,
            "keepalives_idle": 30,
            "keepalives_interval": 5,
            "keepalives_count": 3,
        },
    }


def register_extensions(app: Flask, settings: Settings) -> None:
    """Database, migrations, Redis and Celery."""
    db.init_app(app)
    app.extensions["migrate"] = _LazyMigrate(app)
    with app.app_context():
        if db.engine.dialect.name == "sqlite":
            _serialize_sqlite_writes(db.engine)
    # No client-side retries: a failed call surfaces at once, and callers decide (503, task retry).
    app.extensions["redis"] = redis_client(settings)
    celery_init_app(app)


class _LazyMigrate:
    """Flask-Migrate, set up on first use: Alembic costs every web and worker process about
    11 MB, and only the ``flask db`` commands (and the tests' migrations) need it."""

    def __init__(self, app: Flask) -> None:
        self._app = app

    def __getattr__(self, name: str) -> Any:
        from flask_migrate import Migrate

        Migrate(self._app, db, directory=MIGRATIONS_DIR, render_as_batch=True)  # replaces this proxy
        return getattr(self._app.extensions["migrate"], name)


def _serialize_sqlite_writes(engine: Engine) -> None:
    """Every SQLite transaction takes the write lock at BEGIN, so concurrent workers serialize
    instead of failing to upgrade a read lock; WAL keeps readers from blocking on writers.

    synchronous=FULL: a commit is on disk before it returns. (NORMAL, WAL's usual pairing, may
    undo the last commits on a power cut, while their done marks already reached Redis: later
    copies of those events would then be turned away, and the events lost.)"""

    @event.listens_for(engine, "connect")
    def _connect(dbapi_connection: sqlite3.Connection, _record: Any) -> None:
        dbapi_connection.isolation_level = None  # SQLAlchemy, not the driver, emits BEGIN
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=FULL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _begin(connection: Any) -> None:
        connection.exec_driver_sql("BEGIN IMMEDIATE")


def register_blueprints(app: Flask) -> None:
    """The webhook (answered by its own WSGI endpoint), the read API and the operations endpoints."""
    from app.intake.webhook import WebhookEndpoint
    from app.intake.webhook import bp as webhook_bp
    from app.operating.ops import bp as ops_bp
    from app.reading.api import bp as api_bp

    app.register_blueprint(webhook_bp)
    app.register_blueprint(api_bp)
    app.register_blueprint(ops_bp)
    # A POST to the webhook is answered ahead of Flask (ProxyFix, when set, still comes first).
    app.wsgi_app = WebhookEndpoint(app, app.wsgi_app)  # type: ignore[method-assign]


def register_commands(app: Flask) -> None:
    """``flask voice ...`` (dead letters, replay, sweep, simulate) and ``flask db ...`` (migrations)."""
    from app.operating.cli import voice

    app.cli.add_command(voice)
    app.cli.add_command(_LazyDbGroup("db", help="Database migrations (Flask-Migrate, Alembic)."))


class _LazyDbGroup(click.Group):
    """Flask-Migrate's ``db`` commands, imported only when one is run."""

    def _real(self) -> click.Group:
        from flask_migrate.cli import db as real

        return real

    def make_context(self, info_name: str | None, args: list[str], parent: click.Context | None = None,
                     **extra: Any) -> click.Context:
        return self._real().make_context(info_name, args, parent=parent, **extra)  # its options, its callback


def register_request_hooks(app: Flask, settings: Settings) -> None:
    """Client address from trusted proxies only, a request id on every answer, safe headers."""
    if settings.trusted_proxy_count:
        app.wsgi_app = ProxyFix(app.wsgi_app, x_for=settings.trusted_proxy_count)  # type: ignore[method-assign]

    @app.before_request
    def _request_id() -> None:
        g.request_id = request_id_of(request.environ)

    @app.after_request
    def _headers(response: Response) -> Response:
        response.headers[REQUEST_ID_HEADER] = g.get("request_id", "")
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers.setdefault("Cache-Control", "no-store")
        return response

