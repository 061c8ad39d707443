"""Each web and worker process freezes what it loaded at start-up (app.base.heap), once ready."""

from __future__ import annotations

import gc
import runpy
from collections.abc import Iterator

import pytest
from celery import signals
from flask import Flask

from tests.support import ROOT


@pytest.fixture
def unfrozen() -> Iterator[None]:
    gc.unfreeze()
    assert gc.get_freeze_count() == 0
    yield
    gc.unfreeze()  # the test process goes on collecting as before


def test_a_web_process_freezes_its_start_up_heap_once_the_app_is_loaded(unfrozen: None) -> None:
    hooks = runpy.run_path(str(ROOT / "gunicorn.conf.py"))
    hooks["post_worker_init"](None)  # gunicorn calls it in each web process, the app loaded
    assert gc.get_freeze_count() > 10_000


def test_a_worker_pool_process_freezes_its_start_up_heap(app: Flask, unfrozen: None) -> None:
    signals.worker_process_init.send(sender=None)  # as Celery sends it in each pool process
    assert gc.get_freeze_count() > 10_000
