"""Helpers for the end-to-end tests (``tests/test_e2e_*.py``): real peers through the proxy.

- :func:`demo_behind_proxy`: the demo backend and a proxy in front of it, both
  on 127.0.0.1 in the test's reactor, and both cleaned up afterwards -- the
  backend's listener is stopped only once every connection to it has closed.
  With a :class:`ServerCertificate` the proxy listens on an ``ssl:`` endpoint
  in the :class:`~upgradeproxy.service.ProxyService` that ``--listen`` makes.
- :func:`run_bounded`: run an external program (curl, chromium, node) in its
  own process group, killing the whole group by its id on a timeout and
  whatever is left of it afterwards.
- :class:`BackgroundProcess`: a long-running external peer (a Node server)
  that reports JSON lines on stdout, stopped by its id when the test ends.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import queue
import shutil
import signal
import subprocess
import threading
import time
import urllib.request
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import trustme
from loopback import HOST, TIMEOUT, Loopback, Proxy, eventually, free_port
from twisted.internet import reactor
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.interfaces import IListeningPort
from twisted.internet.protocol import connectionDone
from twisted.internet.threads import deferToThread
from twisted.python.failure import Failure
from websockets.sync.client import ClientConnection
from websockets.sync.client import connect as ws_connect

from upgradeproxy import ProxyFactory
from upgradeproxy.cli.service import ProxyService
from upgradeproxy.demo import DemoBackendFactory, DemoBackendProtocol

E2E_DIR = Path(__file__).parent / "e2e"


class _TrackedDemoProtocol(DemoBackendProtocol):
    def connectionMade(self) -> None:
        self.factory.open.add(self)
        super().connectionMade()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.factory.open.discard(self)
        super().connectionLost(reason)


class TrackedDemoBackend(DemoBackendFactory):
    """The demo backend, knowing which of its connections are still open."""

    protocol = _TrackedDemoProtocol

    def __init__(self) -> None:
        self.open: set[DemoBackendProtocol] = set()


class ServerCertificate:
    """A certificate for ``localhost`` and 127.0.0.1 from a fresh ``trustme`` CA, as files."""

    def __init__(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        ca = trustme.CA()
        issued = ca.issue_cert("localhost", HOST)
        self.ca = directory / "ca.pem"
        self.cert = directory / "cert.pem"
        self.key = directory / "key.pem"
        ca.cert_pem.write_to_path(str(self.ca))
        issued.cert_chain_pems[0].write_to_path(str(self.cert))
        issued.private_key_pem.write_to_path(str(self.key))

    def listen_description(self, port: int) -> str:
        """An ``ssl:`` server endpoint on 127.0.0.1 with this certificate."""
        return ssl_listen_description(self.key, self.cert, port)


def ssl_listen_description(key: Path, cert: Path, port: int = 0) -> str:
    """An ``ssl:`` server endpoint on 127.0.0.1 with the key and certificate in these files."""

    def escape(path: Path) -> str:
        return str(path).replace("\\", "\\\\").replace(":", "\\:")

    return f"ssl:{port}:interface={HOST}:privateKey={escape(key)}:certKey={escape(cert)}"


def _listen_tls(
    loopback: Loopback, backend_port: int, tls: ServerCertificate, **proxy_kwargs: Any
) -> tuple[Proxy, ProxyService]:
    """A proxy to ``backend_port`` listening with TLS, in the service ``--listen ssl:...`` makes."""
    factory = ProxyFactory(TCP4ClientEndpoint(reactor, HOST, backend_port), **proxy_kwargs)
    port = free_port()
    service = ProxyService(factory, [tls.listen_description(port)], reactor=reactor, grace=0)
    service.startService()  # an ssl: endpoint listens at once, or raises
    proxy = Proxy(factory, port)
    loopback.proxies.append(proxy)
    return proxy, service


@contextlib.asynccontextmanager
async def proxy_over_tls(
    loopback: Loopback, backend_port: int, tls: ServerCertificate, **proxy_kwargs: Any
) -> AsyncIterator[Proxy]:
    """A proxy to ``backend_port`` on an ``ssl:`` listener, stopped on the way out.

    ``proxy_kwargs`` go to :class:`~upgradeproxy.ProxyFactory`.
    """
    proxy, service = _listen_tls(loopback, backend_port, tls, **proxy_kwargs)
    try:
        yield proxy
    finally:
        await service.stopService()


@contextlib.asynccontextmanager
async def demo_behind_proxy(
    loopback: Loopback, *, tls: ServerCertificate | None = None, **proxy_kwargs: Any
) -> AsyncIterator[Proxy]:
    """The demo backend on 127.0.0.1 with a proxy (from ``loopback``) in front of it.

    ``proxy_kwargs`` go to :class:`~upgradeproxy.ProxyFactory` (``settings=...``);
    with ``tls``, the proxy listens on an ``ssl:`` endpoint with that certificate.

    On the way out the proxy's idle backend connections are closed, and the
    backend must see every connection to it close before its listener stops:
    a connection the proxy left open is an error.
    """
    demo = TrackedDemoBackend()
    port: IListeningPort = reactor.listenTCP(0, demo, interface=HOST)
    try:
        if tls is None:
            yield loopback.proxy(port.getHost().port, **proxy_kwargs)
        else:
            async with proxy_over_tls(loopback, port.getHost().port, tls, **proxy_kwargs) as proxy:
                yield proxy
    finally:
        for proxy in loopback.proxies:
            proxy.factory.proxy.pool.close_idle()
        try:
            await eventually(lambda: not demo.open, what="the demo backend's connections to close")
        finally:
            for connection in list(demo.open):
                connection.transport.abortConnection()  # type: ignore[union-attr]
            await port.stopListening()


def _kill_group(pid: int) -> None:
    """SIGKILL what is left of the process group that ``pid`` leads (ours)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)


def run_bounded(
    args: Sequence[str | os.PathLike[str]], timeout: float, **kwargs: Any
) -> subprocess.CompletedProcess[bytes]:
    """Run ``args`` to completion (call it in a thread) and capture its output.

    The program runs in a new session, so that it and every process it
    starts (chromium's helpers) form one group; after ``timeout`` seconds the
    group is killed and the test fails, and whatever of the group outlives
    its leader is killed too.
    """
    with subprocess.Popen(
        args,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
        **kwargs,
    ) as process:
        try:
            stdout, stderr = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill_group(process.pid)
            stdout, stderr = process.communicate()
            raise AssertionError(
                f"{args[0]} did not finish within {timeout}s and was killed;"
                f" stdout: {stdout[-2000:]!r}; stderr: {stderr[-2000:]!r}"
            ) from None
        finally:
            _kill_group(process.pid)
    return subprocess.CompletedProcess(list(args), process.returncode, stdout, stderr)


class BackgroundProcess:
    """A long-running program that writes one JSON object per line on stdout.

    :meth:`event` waits for the next line; :meth:`stop` ends the program
    (SIGTERM, then SIGKILL to its process group) and returns its stderr.
    """

    def __init__(self, args: Sequence[str | os.PathLike[str]], **kwargs: Any) -> None:
        self.args = list(args)
        self.process = subprocess.Popen(
            self.args,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
            text=True,
            **kwargs,
        )
        self._lines: queue.Queue[str | None] = queue.Queue()
        self._stderr: list[str] = []
        self._readers = [
            threading.Thread(target=self._read_stdout, daemon=True),
            threading.Thread(target=self._read_stderr, daemon=True),
        ]
        for reader in self._readers:
            reader.start()

    def _read_stdout(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self._lines.put(line)
        self._lines.put(None)

    def _read_stderr(self) -> None:
        assert self.process.stderr is not None
        self._stderr.extend(self.process.stderr)

    @property
    def stderr(self) -> str:
        return "".join(self._stderr)

    def event(self, timeout: float = TIMEOUT) -> dict[str, Any]:
        """The next JSON line (blocking: call it in a thread, or when one is due)."""
        try:
            line = self._lines.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(
                f"{self.args[1:2]} said nothing for {timeout}s; stderr: {self.stderr[-2000:]}"
            ) from None
        if line is None:
            self.process.wait(TIMEOUT)
            status = self.process.returncode
            raise AssertionError(
                f"{self.args[1:2]} exited ({status}); stderr: {self.stderr[-2000:]}"
            )
        event: dict[str, Any] = json.loads(line)
        return event

    def stop(self) -> str:
        """Terminate the program (and its group) and wait for it; return its stderr."""
        if self.process.poll() is None:
            self.process.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(TIMEOUT)
        _kill_group(self.process.pid)
        self.process.wait(TIMEOUT)
        for reader in self._readers:
            reader.join(TIMEOUT)
        return self.stderr


CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


START_TIMEOUT = 30.0


RESULT_TIMEOUT = 30.0


# What the page says about itself: its self-test result and the log it keeps.
PAGE_STATE = """JSON.stringify({
  href: location.href,
  title: document.title,
  result: document.getElementById("result")?.textContent ?? null,
  resultClass: document.getElementById("result")?.className ?? null,
  log: document.getElementById("log")?.textContent ?? null,
})"""


@pytest.fixture(scope="module")
def chromium() -> str:
    for name in CHROMIUM_NAMES:
        path = shutil.which(name)
        if path is not None:
            return path
    pytest.skip("chromium is not installed (see .ci/install-e2e)")


@contextlib.contextmanager
def headless_chromium(
    chromium: str, url: str, workdir: Path, options: Sequence[str] = ()
) -> Iterator[int]:
    """Chromium showing ``url``; yields its DevTools port, and kills it on the way out."""
    profile = workdir / "profile"
    log = (workdir / "chromium.log").open("wb")
    args = [
        chromium,
        "--headless",
        "--no-sandbox",  # the tests may run as root
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--no-default-browser-check",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-extensions",
        "--no-proxy-server",
        f"--user-data-dir={profile}",
        "--remote-debugging-port=0",
        *options,
        url,
    ]
    process = subprocess.Popen(
        args, stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True
    )
    try:
        yield devtools_port(process, profile / "DevToolsActivePort", workdir / "chromium.log")
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(5)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait(5)
            log.close()


def devtools_port(process: subprocess.Popen[bytes], active_port: Path, log: Path) -> int:
    """The port chromium's DevTools listen on, from the file it writes when ready."""
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"chromium exited ({process.returncode}): {tail(log)}")
        with contextlib.suppress(OSError, ValueError, IndexError):
            return int(active_port.read_text().splitlines()[0])
        time.sleep(0.05)
    raise AssertionError(f"chromium's DevTools did not start in {START_TIMEOUT}s: {tail(log)}")


def tail(log: Path) -> str:
    return log.read_text(errors="replace")[-2000:]


def page_target(devtools: int) -> str:
    """The DevTools WebSocket URL of the page chromium opened."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(f"http://127.0.0.1:{devtools}/json/list", timeout=5) as response:
        targets = json.load(response)
    pages = [t["webSocketDebuggerUrl"] for t in targets if t.get("type") == "page"]
    assert len(pages) == 1, targets
    return str(pages[0])


def evaluate(cdp: ClientConnection, call_id: int, expression: str) -> Any:
    """Run ``Runtime.evaluate`` in the page; ``None`` if the page was between documents."""
    cdp.send(
        json.dumps(
            {
                "id": call_id,
                "method": "Runtime.evaluate",
                "params": {"expression": expression, "returnByValue": True},
            }
        )
    )
    while True:
        message = json.loads(cdp.recv(timeout=10))
        if message.get("id") == call_id:
            break
    result = message.get("result", {})
    if "error" in message or "exceptionDetails" in result:
        return None
    return result.get("result", {}).get("value")


def capture_screenshot(cdp: ClientConnection, call_id: int, path: Path) -> None:
    """Write what the page shows now to ``path``, as PNG (``Page.captureScreenshot``)."""
    cdp.send(json.dumps({"id": call_id, "method": "Page.captureScreenshot"}))
    while True:
        message = json.loads(cdp.recv(timeout=10))
        if message.get("id") == call_id:
            break
    assert "error" not in message, message
    path.write_bytes(base64.b64decode(message["result"]["data"]))


def self_test_outcome(
    chromium: str,
    url: str,
    workdir: Path,
    options: Sequence[str] = (),
    screenshot: Path | None = None,
) -> dict[str, Any]:
    """Load ``url`` and wait until the page's self-test has a result; return the page's state.

    ``options`` go to chromium's command line. With ``screenshot``, what the
    page shows once it has a result is saved there as PNG.
    """
    with headless_chromium(chromium, url, workdir, options) as devtools:
        target = page_target(devtools)
        with ws_connect(target, proxy=None, max_size=None, ping_interval=None) as cdp:
            deadline = time.monotonic() + RESULT_TIMEOUT
            state: dict[str, Any] = {}
            call_id = 0
            while time.monotonic() < deadline:
                call_id += 1
                value = evaluate(cdp, call_id, PAGE_STATE)
                if value is not None:
                    state = json.loads(value)
                    if state["href"] == url and state["result"] not in (None, "running…"):
                        if screenshot is not None:
                            capture_screenshot(cdp, call_id + 1, screenshot)
                        return state
                time.sleep(0.05)
    raise AssertionError(f"no self-test result after {RESULT_TIMEOUT}s; the page said {state}")


RESPONSE_TIMEOUT = 5.0


# One line per transfer on stdout: new connections made, status, body size.
WRITE_OUT = "%{num_connects} %{http_code} %{size_download}\\n"


@pytest.fixture(scope="module")
def haproxy() -> str:
    # Debian installs it in /usr/sbin, which a user's PATH may not have.
    path = shutil.which("haproxy") or shutil.which("haproxy", path="/usr/sbin:/usr/local/sbin")
    if path is None:
        pytest.skip("haproxy is not installed (see .ci/install-e2e)")
    return path


@pytest.fixture(scope="module")
def curl() -> str:
    path = shutil.which("curl")
    if path is None:
        pytest.skip("curl is not installed (see .ci/install-e2e)")
    return path


def transfer(url: str, *options: str | Path) -> list[str]:
    """One transfer's arguments: verbose, no proxy from the environment, bounded."""
    return [
        "--silent",
        "--show-error",
        "--verbose",
        "--noproxy",
        "*",
        "--max-time",
        "20",
        "--write-out",
        WRITE_OUT,
        *map(str, options),
        url,
    ]


async def run_curl(curl: str, *transfers: list[str]) -> tuple[list[str], str]:
    """Run the transfers in one curl invocation (so it may reuse its connection).

    Returns the write-out lines (one per transfer) and the verbose log.
    """
    args = [curl]
    for i, t in enumerate(transfers):
        args += ["--next", *t] if i else t
    result: subprocess.CompletedProcess[bytes] = await deferToThread(run_bounded, args, 30)
    log = result.stderr.decode(errors="replace")
    assert result.returncode == 0, f"curl exited with {result.returncode}:\n{log}"
    return result.stdout.decode().splitlines(), log


NPM_TIMEOUT = 120


# Fewer and shorter retries than npm's default (a minute or more with no registry).
NPM_RETRIES = [
    "--fetch-retries=2",
    "--fetch-retry-mintimeout=2000",
    "--fetch-retry-maxtimeout=10000",
]


def _installed_ws_version() -> str | None:
    try:
        package = json.loads((E2E_DIR / "node_modules" / "ws" / "package.json").read_text())
    except (OSError, ValueError):
        return None
    return str(package.get("version"))


def npm_error(stderr: str) -> str:
    """The lines of npm's error output that say what went wrong (not the stack)."""
    lines = [
        line.removeprefix("npm error").strip()
        for line in stderr.splitlines()
        if line.startswith("npm error") and not line.removeprefix("npm error").startswith("  ")
    ]
    return "; ".join(lines[:4]) or stderr.strip()[-300:]


@pytest.fixture(scope="session")
def node() -> Path:
    """The node executable, with ``ws`` installed in ``tests/e2e/node_modules``."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        pytest.skip("node and npm are not installed (see .ci/install-e2e)")
    pinned = json.loads((E2E_DIR / "package.json").read_text())["dependencies"]["ws"]
    if _installed_ws_version() != pinned:
        try:
            result = subprocess.run(
                [npm, "ci", "--no-audit", "--no-fund", *NPM_RETRIES],
                cwd=E2E_DIR,
                capture_output=True,
                text=True,
                timeout=NPM_TIMEOUT,
            )
        except subprocess.TimeoutExpired:
            pytest.skip(f"npm ci in tests/e2e took more than {NPM_TIMEOUT}s")
        if result.returncode != 0:
            pytest.skip(f"npm ci in tests/e2e failed: {npm_error(result.stderr)}")
        assert _installed_ws_version() == pinned, "npm ci did not install the pinned ws"
    return Path(node)
