"""Celery entry point: ``celery -A worker worker``."""

from app import create_app

flask_app = create_app()
celery_app = flask_app.extensions["celery"]
