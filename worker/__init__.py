"""Celery entry point: ``celery -A worker worker`` (and beat, Flower), or ``python -m worker``.

The app is built for the worker role: no blueprints, OpenAPI document or ``flask`` commands.
"""

from app import WORKER, create_app

flask_app = create_app(role=WORKER)
celery_app = flask_app.extensions["celery"]
