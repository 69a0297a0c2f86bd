"""Compiling the benchmark's C programs with the system compiler.

``bench/c/backend.c`` and ``bench/c/loadgen.c`` (with ``bench/c/common.h``)
are built with ``-O2 -Wall -Wextra`` into a build directory, ``bench/build``
by default. A program is rebuilt when a source is newer than it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

C_DIR = Path(__file__).resolve().parent.parent / "c"
DEFAULT_BUILD_DIR = C_DIR.parent / "build"
PROGRAMS = ("backend", "loadgen")
CFLAGS = ("-std=gnu11", "-O2", "-Wall", "-Wextra")


class BuildError(Exception):
    """The compiler is missing or refused a program; the message says which and why."""


@dataclass(frozen=True)
class Programs:
    """Paths of the built programs, and any compiler warnings."""

    backend: Path
    loadgen: Path
    compiler: str
    warnings: list[str] = field(default_factory=list)


def find_compiler() -> str | None:
    """``$CC`` if set, otherwise ``cc`` or ``gcc`` from PATH; ``None`` if there is none."""
    candidates = [os.environ["CC"]] if os.environ.get("CC") else ["cc", "gcc"]
    for name in candidates:
        path = shutil.which(name)
        if path:
            return path
    return None


def _up_to_date(output: Path, sources: list[Path]) -> bool:
    if not output.exists():
        return False
    built = output.stat().st_mtime
    return all(source.stat().st_mtime <= built for source in sources)


def build(build_dir: Path = DEFAULT_BUILD_DIR, *, force: bool = False) -> Programs:
    """Build (or reuse) both programs in ``build_dir`` and return their paths."""
    compiler = find_compiler()
    if compiler is None:
        raise BuildError("no C compiler found: install gcc (or set CC) to build bench/c")
    build_dir.mkdir(parents=True, exist_ok=True)
    warnings: list[str] = []
    paths: dict[str, Path] = {}
    for name in PROGRAMS:
        source = C_DIR / f"{name}.c"
        output = build_dir / name
        paths[name] = output
        if not force and _up_to_date(output, [source, C_DIR / "common.h"]):
            continue
        command = [compiler, *CFLAGS, "-o", str(output), str(source), "-lm"]
        done = subprocess.run(command, capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            raise BuildError(
                f"compiling {source.name} failed ({' '.join(command)}):\n{done.stderr.strip()}"
            )
        if done.stderr.strip():
            warnings.append(f"{source.name}: {done.stderr.strip()}")
    return Programs(paths["backend"], paths["loadgen"], compiler, warnings)
