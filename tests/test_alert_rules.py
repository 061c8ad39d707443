"""The Prometheus rules in deploy/prometheus parse, pass their unit tests, and name real metrics."""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest

from app.applying import hooks
from app.base import metrics
from app.operating import scrape
from tests.support import ROOT

RULES = ROOT / "deploy" / "prometheus" / "voice-rules.yml"
RULE_TESTS = ROOT / "deploy" / "prometheus" / "tests" / "voice-rules.test.yml"


def promtool() -> str:
    found = shutil.which("promtool")
    if not found:
        pytest.fail("promtool is missing: scripts/test.sh installs Debian's prometheus package")
    return found


def test_promtool_checks_the_rules_and_the_example_config() -> None:
    done = subprocess.run([promtool(), "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    done = subprocess.run([promtool(), "check", "config", str(RULES.parent / "prometheus.yml")],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


def test_promtool_unit_tests_pass() -> None:
    done = subprocess.run([promtool(), "test", "rules", str(RULE_TESTS)], capture_output=True, text=True,
                          timeout=120, cwd=RULE_TESTS.parent)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS" in done.stdout


def exported_names() -> set[str]:
    """Every sample name the service's processes serve, as prometheus_client writes them."""
    names = {scrape.SOURCE_UP, *(name for name, *_ in scrape.STATE_GAUGES)}
    for gauge in (metrics.SWEEP_LAST_RUN, metrics.SWEEP_INTERVAL):
        names.update(family.name for family in gauge.collect())
    for metric in (metrics.WEBHOOKS, metrics.ACK_SECONDS, metrics.EVENTS, metrics.EVENT_LAG, metrics.UNKNOWN_AT_VALUES,
                   hooks.SENT, hooks.FAILED):
        for family in metric.collect():  # a labelled metric has no sample until first used: name them
            suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_count", "_sum"]}[family.type]
            names.update(family.name + suffix for suffix in suffixes)
    return names


def test_every_alert_names_a_metric_the_service_exports() -> None:
    """An alert on a metric nobody serves never fires; only recorded series and up may be added."""
    text = RULES.read_text()
    expressions = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
    used = set(re.findall(r"\b(voice_[a-z_]+)\b", expressions.split("groups:", 1)[1]))
    assert used, "the rules name no voice_ metric"
    assert used <= exported_names(), used - exported_names()
    recorded = set(re.findall(r"record: (voice:[a-z_0-9:]+)", text))
    assert set(re.findall(r"\b(voice:[a-z_0-9:]+)", expressions)) <= recorded
