"""Compiling the benchmark's C programs with the system compiler.

``bench/c/backend.c``, ``bench/c/loadgen.c`` and ``bench/c/h2ws.c`` (with
``bench/c/common.h``) are built with ``-O2 -Wall -Wextra`` into a build
directory, ``bench/build`` by default. A program is rebuilt when a source is
newer than it. ``h2ws`` needs libnghttp2 and OpenSSL: where they are missing
it is not built, and :attr:`Programs.missing` says why.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

C_DIR = Path(__file__).resolve().parent.parent / "c"
DEFAULT_BUILD_DIR = C_DIR.parent / "build"
CFLAGS = ("-std=gnu11", "-O2", "-Wall", "-Wextra")


@dataclass(frozen=True)
class Program:
    """One C program: its libraries, and for an optional one, the packages it needs."""

    name: str
    libraries: tuple[str, ...] = ()
    #: None: the benchmark cannot run without it; else what to install to build it.
    optional: str | None = None


PROGRAMS = (
    Program("backend"),
    Program("loadgen"),
    Program("h2ws", ("-lnghttp2", "-lssl", "-lcrypto"), "libnghttp2-dev and libssl-dev"),
)


class BuildError(Exception):
    """The compiler is missing or refused a program; the message says which and why."""


@dataclass(frozen=True)
class Programs:
    """Paths of the built programs, and any compiler warnings."""

    backend: Path
    loadgen: Path
    compiler: str
    warnings: list[str] = field(default_factory=list)
    #: The WebSocket-over-HTTP/2 load generator; None if it could not be built.
    h2ws: Path | None = None
    #: Optional programs that could not be built, and why.
    missing: dict[str, str] = field(default_factory=dict)


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
    """Build (or reuse) the programs in ``build_dir`` and return their paths."""
    compiler = find_compiler()
    if compiler is None:
        raise BuildError("no C compiler found: install gcc (or set CC) to build bench/c")
    build_dir.mkdir(parents=True, exist_ok=True)
    warnings: list[str] = []
    missing: dict[str, str] = {}
    paths: dict[str, Path] = {}
    for program in PROGRAMS:
        source = C_DIR / f"{program.name}.c"
        output = build_dir / program.name
        if not force and _up_to_date(output, [source, C_DIR / "common.h"]):
            paths[program.name] = output
            continue
        command = [compiler, *CFLAGS, "-o", str(output), str(source), "-lm", *program.libraries]
        done = subprocess.run(command, capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            if program.optional is not None:
                first = done.stderr.strip().splitlines()[:1]
                missing[program.name] = (
                    f"{source.name} did not compile (install {program.optional}): "
                    + (first[0] if first else f"status {done.returncode}")
                )
                continue
            raise BuildError(
                f"compiling {source.name} failed ({' '.join(command)}):\n{done.stderr.strip()}"
            )
        paths[program.name] = output
        if done.stderr.strip():
            warnings.append(f"{source.name}: {done.stderr.strip()}")
    return Programs(
        paths["backend"], paths["loadgen"], compiler, warnings, paths.get("h2ws"), missing
    )
