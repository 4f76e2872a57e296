"""comptrust sets OpenMP's waiting before torch loads (comptrust/__init__.py), and a value the user set wins."""

from __future__ import annotations

import os
import subprocess
import sys

PROBE = "import os, comptrust; print(os.environ['OMP_WAIT_POLICY'], os.environ['GOMP_SPINCOUNT'])"


def _probe(**env: str) -> str:
    base = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    return subprocess.run([sys.executable, "-c", PROBE], env={**base, **env}, capture_output=True, text=True,
                          check=True).stdout.strip()


def test_short_spin_then_sleep_by_default():
    assert _probe() == "PASSIVE 2000"


def test_the_users_setting_wins():
    assert _probe(GOMP_SPINCOUNT="0", OMP_WAIT_POLICY="ACTIVE") == "ACTIVE 0"
