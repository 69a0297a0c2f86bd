"""The package's layers: what each may import, and what importing it costs."""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path


def test_a_validator_plugin_imports_neither_tls_metrics_nor_the_twistd_glue() -> None:
    code = (
        "import sys, upgradeproxy.interfaces, upgradeproxy.validators, upgradeproxy.registry\n"
        "heavy = [m for m in ('OpenSSL', 'prometheus_client', 'twisted.application.service',"
        " 'upgradeproxy.cli.tap', 'upgradeproxy.core.proxy') if m in sys.modules]\n"
        "print(','.join(heavy))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


_PACKAGE = Path(__file__).resolve().parent.parent / "upgradeproxy"
#: Where the request path lives, and what it is built from.
_CORE = ("core", "http1", "_twisted.py", "interfaces.py", "validators.py", "rfc6455.py", "web.py")


def _imports(source: Path) -> Iterator[tuple[int, str]]:
    """Every module ``source`` imports, as absolute names (TYPE_CHECKING and local imports too)."""
    package = ".".join(source.relative_to(_PACKAGE.parent).with_suffix("").parts)
    if source.name != "__init__.py":
        package = package.rsplit(".", 1)[0]
    for node in ast.walk(ast.parse(source.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")
            if node.level:
                base = base[: len(base) - (node.level - 1)]
                module = ".".join([*base, *([node.module] if node.module else [])])
            else:
                module = node.module or ""
            yield node.lineno, module
            for alias in node.names:
                yield node.lineno, f"{module}.{alias.name}"


def test_the_request_path_never_imports_the_command_line_or_operations() -> None:
    found = []
    for part in _CORE:
        root = _PACKAGE / part
        for source in [root] if root.is_file() else sorted(root.rglob("*.py")):
            for line, module in _imports(source):
                if module.startswith(("upgradeproxy.cli", "upgradeproxy.ops", "upgradeproxy.tap")):
                    found.append(f"{source.relative_to(_PACKAGE)}:{line}: {module}")
    assert found == []
