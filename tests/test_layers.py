"""The package's layers: what each may import, and what importing it costs."""

from __future__ import annotations

import subprocess
import sys


def test_a_validator_plugin_imports_neither_tls_metrics_nor_the_twistd_glue() -> None:
    code = (
        "import sys, upgradeproxy.interfaces, upgradeproxy.validators, upgradeproxy.registry\n"
        "heavy = [m for m in ('OpenSSL', 'prometheus_client', 'twisted.application.service',"
        " 'upgradeproxy.tap', 'upgradeproxy.proxy') if m in sys.modules]\n"
        "print(','.join(heavy))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
