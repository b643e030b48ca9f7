"""The systemd unit: it verifies, its hardening scores, and it says what the daemon relies on.

These tests need `systemd-analyze` (Debian package `systemd`; .ci/run installs
it). A missing tool fails them, never skips them: a skipped check here would
let an unverified unit ship looking green.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

UNIT = Path(__file__).resolve().parents[1] / "systemd" / "spotguard.service"
MAX_EXPOSURE = 2.0
NANO_MEMORY = 512 * 2**20  # a t4g.nano
INSTALLED_EXEC = "/usr/local/bin/spotguard"


def systemd_analyze() -> str:
    exe = shutil.which("systemd-analyze")
    if exe is None:
        pytest.fail("systemd-analyze not found: install the `systemd` package (apt-get install systemd)")
    return exe


def run_analyze(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "SYSTEMD_COLORS": "0", "SYSTEMD_PAGER": "", "SYSTEMD_LOG_COLOR": "0"}
    return subprocess.run([systemd_analyze(), *args], capture_output=True, text=True, env=env, timeout=60)


def settings(text: str) -> list[tuple[str, str, str]]:
    """(section, key, value) for every assignment, in order; keys may repeat, as in systemd."""
    out, section = [], ""
    for line in text.splitlines():
        line = line.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1]
            continue
        key, _, value = line.partition("=")
        out.append((section, key.strip(), value.strip()))
    return out


def service_value(key: str) -> str:
    values = [v for s, k, v in settings(UNIT.read_text()) if s == "Service" and k == key]
    assert values, f"{key}= missing from [Service]"
    return values[-1]


def verifiable_copy(tmp_path: Path, extra: str = "") -> Path:
    """The unit with ExecStart pointed at a binary that exists here.

    `systemd-analyze verify` fails when ExecStart's binary is missing, and the
    unit names where a root `pip install` puts it (/usr/local/bin), which a test
    machine need not have. Everything else in the unit is checked as written.
    The venv's own `spotguard` script is used when installed, else /bin/true.
    """
    script = Path(sys.executable).with_name("spotguard")
    exe = str(script) if os.access(script, os.X_OK) else "/bin/true"
    text = UNIT.read_text()
    assert f"ExecStart={INSTALLED_EXEC} " in text
    copy = tmp_path / UNIT.name
    copy.write_text(text.replace(f"ExecStart={INSTALLED_EXEC} ", f"ExecStart={exe} ") + extra)
    return copy


def verify_complaints(unit: Path) -> list[str]:
    result = run_analyze("verify", str(unit))
    lines = (result.stdout + result.stderr).splitlines()
    # Unknown keys and bad values are only warnings (exit 0): count any line about our unit.
    complaints = [line for line in lines if unit.name in line or str(unit) in line]
    if result.returncode != 0:
        complaints.append(f"exit {result.returncode}: {result.stderr.strip()}")
    return complaints


def test_unit_runs_the_daemon_as_a_notify_service():
    assert service_value("Type") == "notify"
    assert service_value("NotifyAccess") == "main"
    assert service_value("ExecStart") == f"{INSTALLED_EXEC} run --config /etc/spotguard/config.toml"
    assert service_value("Restart") == "on-failure"
    assert service_value("RestartSec") == "5"
    assert service_value("WatchdogSec") == "30"
    assert service_value("TimeoutStopSec") == "60"
    assert service_value("DynamicUser") == "yes"
    assert service_value("StateDirectory") == "spotguard"
    assert service_value("ConfigurationDirectory") == "spotguard"


def test_a_bad_config_is_not_restarted_and_memory_is_bounded_for_a_nano():
    assert service_value("RestartPreventExitStatus") == "2"  # `spotguard run`'s exit for a bad config
    high, most = _bytes(service_value("MemoryHigh")), _bytes(service_value("MemoryMax"))
    steady = 62 * 2**20  # docs/benchmarks.md: about 62 MiB for 1 to 20 guards
    assert 2 * steady <= high < most <= NANO_MEMORY // 2
    docs = [v for s, k, v in settings(UNIT.read_text()) if s == "Unit" and k == "Documentation"]
    assert docs and all(url.startswith(("file:///", "https://")) for url in docs[0].split())


def _bytes(text: str) -> int:
    units = {"K": 2**10, "M": 2**20, "G": 2**30}
    return int(text[:-1]) * units[text[-1]] if text[-1] in units else int(text)


def test_unit_keeps_the_network_the_daemon_needs():
    families = set(service_value("RestrictAddressFamilies").split())
    assert families == {"AF_INET", "AF_INET6", "AF_UNIX"}
    service = {k: v for s, k, v in settings(UNIT.read_text()) if s == "Service"}
    assert service.get("PrivateNetwork", "no") == "no", "AWS and Discord need the host's network"
    assert "IPAddressDeny" not in service, "AWS endpoints have no fixed addresses"


def test_verify_passes(tmp_path):
    assert verify_complaints(verifiable_copy(tmp_path)) == []


def test_verify_check_notices_a_bad_key(tmp_path):
    # The check above must be able to fail: a typo is only a warning to systemd.
    assert verify_complaints(verifiable_copy(tmp_path, "\n[Service]\nRestartSecs=5\n"))


def test_security_exposure_is_low():
    result = run_analyze("security", "--offline=true", "--no-pager", str(UNIT))
    assert result.returncode == 0, result.stderr
    match = re.search(r"Overall exposure level for \S+: (\d+(?:\.\d+)?)", result.stdout)
    assert match, f"no exposure level in systemd-analyze output:\n{result.stdout[-2000:]}{result.stderr}"
    exposure = float(match.group(1))
    assert exposure <= MAX_EXPOSURE, f"exposure {exposure} > {MAX_EXPOSURE}:\n{result.stdout}"


def test_missing_systemd_analyze_fails_not_skips(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(pytest.fail.Exception, match="systemd-analyze not found"):
        systemd_analyze()
