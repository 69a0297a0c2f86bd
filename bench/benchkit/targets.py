"""The things under test, and how to run each one the same way.

A target is where the load generator connects:

- ``direct``: the C backend itself, no proxy -- the limit of this setup;
- ``upgradeproxy``: ``twistd -n upgradeproxy`` from this repository;
- ``nginx``, ``haproxy``, ``caddy``: when installed, each with one worker
  (Caddy with ``GOMAXPROCS=1``), configured by this module as a
  WebSocket-capable reverse proxy in front of the same backend;
- ``mitmproxy``, ``proxy.py``: the Python peers, from :mod:`benchkit.peers`.

A context with ``all_cores`` set asks each proxy for its all-cores
configuration instead: nginx ``worker_processes auto``, HAProxy's default
threads, Caddy without ``GOMAXPROCS``, upgradeproxy ``--workers auto``.

Every proxy listens on a free port on 127.0.0.1, runs pinned to the proxy
CPU (unless the scenario pins nothing), keeps its configuration and logs in
its own directory under the run's temporary directory, and logs what it
logs by default. For the HTTP/2 scenarios (``Context.tls``) each listens
with TLS instead, with a throw-away certificate, and offers ``h2`` and
``http/1.1`` by ALPN: upgradeproxy by default, nginx with ``http2`` on its
``listen``, HAProxy with ``alpn h2,http/1.1`` on its ``bind``, Caddy by
default (HTTP/3 off). This module also reads those logs back: warnings and
errors that appeared while the load ran become *findings* in the report.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from .build import Programs
from .procs import HOST, Process, StartError, free_port, wait_listening

REPO = Path(__file__).resolve().parent.parent.parent
_SBIN = ("/usr/sbin", "/usr/local/sbin", "/sbin")
#: Connection limit for nginx and HAProxy: room for 5,000 tunnels (two
#: connections each) without preallocating for far more (which nginx does).
MAX_CONNECTIONS = 16384


@dataclass(frozen=True)
class TLSFiles:
    """A self-signed certificate for ``localhost`` and 127.0.0.1, as PEM files."""

    cert: Path
    key: Path
    #: Certificate and key in one file (HAProxy's ``crt``).
    combined: Path

    @classmethod
    def create(cls, directory: Path) -> TLSFiles:
        """Make a fresh ECDSA P-256 certificate with ``openssl`` (StartError without it)."""
        openssl = shutil.which("openssl")
        if openssl is None:
            raise StartError("openssl is not installed: no certificate for the TLS scenarios")
        directory.mkdir(parents=True, exist_ok=True)
        files = cls(directory / "cert.pem", directory / "key.pem", directory / "combined.pem")
        # Ask for ECDSA explicitly: cheaper handshakes than RSA, as on most sites today.
        argv = [openssl, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256"]
        argv += ["-nodes", "-days", "2", "-subj", "/CN=localhost", "-keyout", str(files.key)]
        argv += ["-out", str(files.cert), "-addext", f"subjectAltName=DNS:localhost,IP:{HOST}"]
        done = subprocess.run(argv, capture_output=True, text=True, timeout=30)
        if done.returncode != 0:
            raise StartError(f"openssl could not make a certificate: {done.stderr.strip()}")
        files.combined.write_bytes(files.cert.read_bytes() + files.key.read_bytes())
        return files


@dataclass
class Context:
    """What every target and scenario needs to know about this run."""

    programs: Programs
    workdir: Path
    load_cpu: int | None
    proxy_cpu: int | None
    nofile: int
    twistd: str | None
    upgradeproxy_args: list[str] = field(default_factory=list)
    #: ``--workers`` for upgradeproxy, after the extra arguments; None leaves its default.
    workers: int | None = None
    #: Each proxy in its configuration for every core (see the module docstring).
    all_cores: bool = False
    #: The load is plain requests on kept-alive connections (proxy.py needs to know).
    keep_alive: bool = False
    #: The benchmark's own virtualenv for the Python peers (see :mod:`benchkit.peers`).
    peers: Path | None = None
    #: The run's certificate, made when a scenario needs TLS.
    certificate: TLSFiles | None = None
    #: When set, the proxies listen with TLS, with these files, and offer HTTP/2.
    tls: TLSFiles | None = None


@dataclass
class Backend:
    """The C backend of one run: its port, and its process (for CPU time)."""

    port: int
    process: Process


@dataclass
class Running:
    """A target that accepts connections on ``port``; ``process`` is None for ``direct``."""

    target: Target
    port: int
    process: Process | None
    log_files: list[Path] = field(default_factory=list)
    # Where each log file stood when the target was ready, and when it began
    # to stop: findings are what was logged in between.
    _offsets: dict[Path, int] = field(default_factory=dict)
    _ends: dict[Path, int] = field(default_factory=dict)

    def _sizes(self) -> dict[Path, int]:
        return {path: path.stat().st_size if path.exists() else 0 for path in self.log_files}

    def mark_ready(self) -> None:
        self._offsets = self._sizes()

    def mark_stopping(self) -> None:
        """What it logs from now on (shutting down) is not about the load."""
        self._ends = self._sizes()

    def startup_log(self) -> str:
        return "".join(_read(path, 0, self._offsets.get(path)) for path in self.log_files)

    def load_log(self) -> str:
        return "".join(
            _read(path, self._offsets.get(path, 0), self._ends.get(path)) for path in self.log_files
        )

    def findings(self) -> list[str]:
        """Warnings and errors logged while the load ran, grouped, most frequent first."""
        return summarize(self.target.notable_lines(self.load_log()))


def _read(path: Path, start: int, end: int | None) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(start)
            data = f.read() if end is None else f.read(max(0, end - start))
    except OSError:
        return ""
    return data.decode(errors="replace")


def summarize(lines: list[str], limit: int = 6) -> list[str]:
    """Group log lines that differ only in numbers; ``'12x <first example>'``, top ``limit``."""
    groups: dict[str, tuple[int, str]] = {}
    for line in lines:
        key = re.sub(r"\d+", "N", line)
        count, example = groups.get(key, (0, line))
        groups[key] = (count + 1, example)
    ranked = sorted(groups.values(), key=lambda item: -item[0])
    out = [f"{count}x {example[:300]}" for count, example in ranked[:limit]]
    if len(ranked) > limit:
        out.append(f"... and {len(ranked) - limit} other kinds of line")
    return out


def find_program(name: str) -> str | None:
    """``name`` on PATH, or in an sbin directory (not on a normal user's PATH)."""
    found = shutil.which(name)
    if found:
        return found
    for directory in _SBIN:
        candidate = Path(directory) / name
        if os.access(candidate, os.X_OK):
            return str(candidate)
    return None


def first_line(argv: list[str]) -> str:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"unknown ({e})"
    text = (done.stdout + done.stderr).strip()
    return text.splitlines()[0] if text else "unknown"


class Target:
    """Base class: a named thing that load can be sent to."""

    name = "?"
    #: Regex for log lines worth reporting (warnings, errors).
    notable = re.compile(r"$^")

    def unavailable(self, ctx: Context) -> str | None:
        """None if this target can run here, else why not (one line)."""
        return None

    def version(self, ctx: Context) -> str:
        return ""

    def prepare(self, ctx: Context, port: int, backend_port: int, rundir: Path) -> Launch:
        raise NotImplementedError

    def notable_lines(self, text: str) -> list[str]:
        return [line.strip() for line in text.splitlines() if self.notable.search(line)]

    @contextlib.contextmanager
    def run(self, ctx: Context, backend_port: int) -> Iterator[Running]:
        """Start it in front of the backend, yield it while it listens, then stop it."""
        running = None
        for attempt in (1, 2):  # the free port may be taken before the server binds it
            port = free_port()
            rundir = Path(tempfile.mkdtemp(prefix=f"{self.name}-", dir=ctx.workdir))
            launch = self.prepare(ctx, port, backend_port, rundir)
            process = Process(
                self.name,
                launch.argv,
                log_path=rundir / "output.log",
                cpu=ctx.proxy_cpu,
                cwd=rundir,
                env=launch.env,
            )
            try:
                process.start()
                wait_listening(process, port)
            except (StartError, OSError):
                process.stop()
                if attempt == 2:
                    raise
                continue
            running = Running(self, port, process, [rundir / "output.log", *launch.logs])
            break
        assert running is not None and running.process is not None
        try:
            running.mark_ready()
            yield running
        finally:
            time.sleep(0.2)  # let the last log lines of the load reach the files
            running.mark_stopping()
            running.process.stop()


@dataclass
class Launch:
    """How to start a prepared target: the command, its environment, its extra log files."""

    argv: list[str]
    env: dict[str, str] | None = None
    logs: list[Path] = field(default_factory=list)


class Direct(Target):
    """No proxy: the load generator talks to the backend itself."""

    name = "direct"

    def version(self, ctx: Context) -> str:
        return "C backend (bench/c/backend.c)"

    @contextlib.contextmanager
    def run(self, ctx: Context, backend_port: int) -> Iterator[Running]:
        yield Running(self, backend_port, None)


class UpgradeProxy(Target):
    """``twistd -n upgradeproxy`` from this repository's virtualenv."""

    name = "upgradeproxy"
    # twistd's log format: "TIMESTAMP [namespace#level] message"
    notable = re.compile(r"#(warn|error|critical)\]|Traceback|Unhandled|Error:|EMFILE|open files")

    def unavailable(self, ctx: Context) -> str | None:
        if ctx.twistd is None:
            return (
                "no twistd found (looked for .venv/bin/twistd and on PATH); "
                "install the project or pass --twistd"
            )
        return None

    def version(self, ctx: Context) -> str:
        twisted = first_line([ctx.twistd or "twistd", "--version"])
        commit = first_line(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"])
        dirty = subprocess.run(
            ["git", "-C", str(REPO), "status", "--porcelain", "--", "upgradeproxy", "twisted"],
            capture_output=True,
            text=True,
            check=False,
        ).stdout.strip()
        return f"upgradeproxy @ {commit}{' + uncommitted changes' if dirty else ''}; {twisted}"

    def prepare(self, ctx: Context, port: int, backend_port: int, rundir: Path) -> Launch:
        assert ctx.twistd is not None
        argv = [
            ctx.twistd,
            "-n",
            "--pidfile=",
            "--logfile=-",  # to output.log: a --logfile FILE is rotated every megabyte
            "upgradeproxy",
            "--listen",
            _upgradeproxy_listen(port, ctx.tls),
            "--backend",
            f"http://{HOST}:{backend_port}",
            # Like nginx's access_log: one line per request into a file.
            "--access-log",
            str(rundir / "access.log"),
            *ctx.upgradeproxy_args,
        ]
        workers = "auto" if ctx.all_cores else ctx.workers
        if workers is not None:
            argv += ["--workers", str(workers)]
        return Launch(argv)


def _upgradeproxy_listen(port: int, tls: TLSFiles | None) -> str:
    if tls is None:
        return f"tcp:{port}:interface={HOST}"
    return f"ssl:{port}:interface={HOST}:privateKey={tls.key}:certKey={tls.cert}"


NGINX_CONF = """\
# Generated by bench/benchkit/targets.py: nginx as a WebSocket-capable reverse proxy.
daemon off;
master_process on;
worker_processes {workers};
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;

events {{
    worker_connections {connections};
}}

http {{
    access_log {dir}/access.log;
    client_body_temp_path {dir}/client_body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;

    # "Connection: upgrade" for upgrades, nothing otherwise, so that plain
    # requests can use the keep-alive pool below (nginx's documented recipe).
    map $http_upgrade $connection_upgrade {{
        default upgrade;
        ''      '';
    }}

    upstream backend {{
        server {host}:{backend_port};
        keepalive 64;
    }}

    server {{
        listen {host}:{port}{listen_options};{tls_lines}
        location / {{
            proxy_pass http://backend;
            proxy_http_version 1.1;
            proxy_set_header Host $host;
            proxy_set_header Upgrade $http_upgrade;
            proxy_set_header Connection $connection_upgrade;
            proxy_read_timeout 1h;
            proxy_send_timeout 1h;
        }}
    }}
}}
"""


class Nginx(Target):
    name = "nginx"
    notable = re.compile(r"\[(warn|error|crit|alert|emerg)\]")

    def unavailable(self, ctx: Context) -> str | None:
        return None if find_program("nginx") else "nginx is not installed"

    def version(self, ctx: Context) -> str:
        return first_line([find_program("nginx") or "nginx", "-v"])

    def prepare(self, ctx: Context, port: int, backend_port: int, rundir: Path) -> Launch:
        config = rundir / "nginx.conf"
        config.write_text(
            NGINX_CONF.format(
                dir=rundir,
                host=HOST,
                port=port,
                backend_port=backend_port,
                connections=max(1024, min(MAX_CONNECTIONS, ctx.nofile - 64)),
                workers="auto" if ctx.all_cores else 1,
                # nginx 1.22's HTTP/2: plain requests only (no extended CONNECT).
                listen_options=" ssl http2" if ctx.tls else "",
                tls_lines=(
                    f"\n        ssl_certificate {ctx.tls.cert};"
                    f"\n        ssl_certificate_key {ctx.tls.key};"
                    # Not a GOAWAY every 1,000 requests (in flight ones fail).
                    "\n        keepalive_requests 1000000;"
                    if ctx.tls
                    else ""
                ),
            )
        )
        nginx = find_program("nginx")
        assert nginx is not None
        argv = [nginx, "-p", f"{rundir}/", "-c", str(config), "-e", str(rundir / "error.log")]
        return Launch(argv, logs=[rundir / "error.log"])


HAPROXY_CONF = """\
# Generated by bench/benchkit/targets.py: HAProxy as a WebSocket-capable reverse proxy.
global
{threads}    maxconn {maxconn}

defaults
    mode http
    maxconn {maxconn}
    timeout connect 5s
    timeout client 1h
    timeout server 1h
    timeout tunnel 1h

frontend bench
    bind {host}:{port}{bind_options}
    default_backend app

backend app
    server app {host}:{backend_port}
"""


class HAProxy(Target):
    name = "haproxy"
    notable = re.compile(r"\[(WARNING|ALERT)\]")

    def unavailable(self, ctx: Context) -> str | None:
        return None if find_program("haproxy") else "haproxy is not installed"

    def version(self, ctx: Context) -> str:
        return first_line([find_program("haproxy") or "haproxy", "-v"])

    def prepare(self, ctx: Context, port: int, backend_port: int, rundir: Path) -> Launch:
        config = rundir / "haproxy.cfg"
        # Each proxied connection holds two descriptors.
        maxconn = max(1000, min(MAX_CONNECTIONS, (ctx.nofile - 200) // 2))
        config.write_text(
            HAPROXY_CONF.format(
                host=HOST,
                port=port,
                backend_port=backend_port,
                maxconn=maxconn,
                # Left out, HAProxy starts a thread per CPU it may run on.
                threads="" if ctx.all_cores else "    nbthread 1\n",
                # Without alpn, HAProxy's TLS listener speaks HTTP/1.1 only.
                bind_options=f" ssl crt {ctx.tls.combined} alpn h2,http/1.1" if ctx.tls else "",
            )
        )
        haproxy = find_program("haproxy")
        assert haproxy is not None
        return Launch([haproxy, "-db", "-f", str(config)])


CADDYFILE = """\
# Generated by bench/benchkit/targets.py: Caddy as a reverse proxy (WebSocket included).
{{
    admin off
    auto_https off{global_options}
}}

{scheme}://{host}:{port} {{
    bind {host}{site_options}
    reverse_proxy {host}:{backend_port}
}}
"""


_CADDY_NOTABLE = ("warn", "error", "panic", "fatal")


class Caddy(Target):
    name = "caddy"

    def unavailable(self, ctx: Context) -> str | None:
        return None if find_program("caddy") else "caddy is not installed"

    def version(self, ctx: Context) -> str:
        return "caddy " + first_line([find_program("caddy") or "caddy", "version"])

    def prepare(self, ctx: Context, port: int, backend_port: int, rundir: Path) -> Launch:
        config = rundir / "Caddyfile"
        config.write_text(
            CADDYFILE.format(
                host=HOST,
                port=port,
                backend_port=backend_port,
                scheme="https" if ctx.tls else "http",
                # HTTP/1.1 and HTTP/2 over TCP, as the others (no HTTP/3 over UDP).
                global_options="\n    servers {\n        protocols h1 h2\n    }" if ctx.tls else "",
                site_options=f"\n    tls {ctx.tls.cert} {ctx.tls.key}" if ctx.tls else "",
            )
        )
        caddy = find_program("caddy")
        assert caddy is not None
        env = dict(os.environ)
        # One P for the Go scheduler (none set: one per CPU); Caddy's state and
        # config stay in the run directory.
        env.pop("GOMAXPROCS", None)
        if not ctx.all_cores:
            env["GOMAXPROCS"] = "1"
        env.update(
            HOME=str(rundir),
            XDG_DATA_HOME=str(rundir / "data"),
            XDG_CONFIG_HOME=str(rundir / "config"),
        )
        return Launch([caddy, "run", "--config", str(config), "--adapter", "caddyfile"], env)

    def notable_lines(self, text: str) -> list[str]:
        notable = []
        for line in text.splitlines():
            try:
                entry = json.loads(line)
            except ValueError:
                if line.strip():
                    notable.append(line.strip())  # panics and other non-JSON output
                continue
            if isinstance(entry, dict) and entry.get("level") in _CADDY_NOTABLE:
                fields = {k: v for k, v in entry.items() if k not in ("ts", "level", "logger")}
                notable.append(f"[{entry['level']}] {json.dumps(fields)[:300]}")
        return notable


#: The native targets; :data:`benchkit.peers.ALL` adds the Python peers.
NATIVE: list[Target] = [Direct(), UpgradeProxy(), Nginx(), HAProxy(), Caddy()]
