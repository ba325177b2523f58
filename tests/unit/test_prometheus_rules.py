"""deploy/prometheus validates with promtool; its alert unit tests pass and cover every alert."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
PROMETHEUS = ROOT / "deploy" / "prometheus"
CONFIG = PROMETHEUS / "prometheus.yml"
ALERTS = PROMETHEUS / "alerts.yml"
ALERT_TESTS = PROMETHEUS / "alerts.test.yml"


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    exe = shutil.which("promtool")
    if exe is None:
        pytest.fail(
            "promtool is not installed: run scripts/install-system-packages.sh as root "
            "(it installs Debian's prometheus package, as CI does)"
        )
    return subprocess.run(
        [exe, *args], capture_output=True, text=True, cwd=ROOT, timeout=120, check=False
    )


def test_config_is_valid() -> None:
    result = promtool("check", "config", str(CONFIG.relative_to(ROOT)))
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    # A missing file_sd file is only a warning to promtool.
    assert "WARNING" not in output, output


def test_every_job_reads_an_existing_targets_file() -> None:
    config = yaml.safe_load(CONFIG.read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    expected = {"prometheus", "registry", "training", "inference", "worker", "envoy", "mlflow"}
    assert set(jobs) == expected
    for name, job in jobs.items():
        files = [f for sd in job["file_sd_configs"] for f in sd["files"]]
        assert files == [f"targets/{name}.json"], name
        assert (PROMETHEUS / files[0]).is_file(), files[0]
    assert jobs["envoy"]["metrics_path"] == "/stats/prometheus"
    assert config["rule_files"] == ["alerts.yml"]


def test_rules_are_valid() -> None:
    result = promtool("check", "rules", str(ALERTS.relative_to(ROOT)))
    assert result.returncode == 0, result.stdout + result.stderr


def test_alert_unit_tests_pass() -> None:
    result = promtool("test", "rules", str(ALERT_TESTS.relative_to(ROOT)))
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "SUCCESS" in output, output


def test_every_alert_has_a_firing_and_a_quiet_case() -> None:
    rules = yaml.safe_load(ALERTS.read_text())
    alerts = {
        rule["alert"] for group in rules["groups"] for rule in group["rules"] if "alert" in rule
    }
    for rule in (r for group in rules["groups"] for r in group["rules"] if "alert" in r):
        assert rule["labels"].get("severity") in {"critical", "warning"}, rule["alert"]
        assert {"summary", "description"} <= set(rule["annotations"]), rule["alert"]

    tests = yaml.safe_load(ALERT_TESTS.read_text())
    assert tests["rule_files"] == ["alerts.yml"]
    cases = [case for test in tests["tests"] for case in test.get("alert_rule_test", [])]
    firing = {case["alertname"] for case in cases if case.get("exp_alerts")}
    quiet = {case["alertname"] for case in cases if not case.get("exp_alerts")}
    assert alerts - firing == set(), "alerts without a firing case in alerts.test.yml"
    assert alerts - quiet == set(), "alerts without a not-firing case in alerts.test.yml"
    assert (firing | quiet) - alerts == set(), "alert tests for alerts that do not exist"
