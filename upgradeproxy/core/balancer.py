"""Several backends behind one route: choosing one, and knowing which are healthy.

A :class:`BackendGroup` holds the backends of a route. For every request the
proxy asks it for one (:meth:`BackendGroup.choose`) and tells it how the
connection went (:meth:`~BackendGroup.connect_failed`,
:meth:`~BackendGroup.connect_succeeded`); it keeps each backend's load in
:attr:`Backend.active` itself. Health is known two ways:

- passively: a backend that refused a connection is left out for
  ``fail_timeout`` seconds, then tried again, with no timer -- unless it is
  the route's only backend, which stays in use (as in nginx: taking it out
  turns a backend's one-second restart into ``fail_timeout`` seconds of 503s);
- actively, when a :class:`HealthCheck` is given: ``GET path`` on a new
  connection every ``interval`` seconds. A failed check takes even an only
  backend out of rotation (the log and the status say so), and requests
  then reach it as the last resort, below.

When no backend is healthy, a request still goes to the one whose last
failure is the oldest (whose ``fail_timeout`` ends first): the proxy's own
503 is never a better answer than a backend that came back. Only when that
try fails too does the client get the 503.

The log says when a backend goes down and when it is back in use, once
each, however often it keeps failing in between. This module never reads or
writes a proxied request.
"""

from __future__ import annotations

import enum
import hashlib
from collections import Counter
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import dataclass

from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectError, ConnectionRefusedError, DNSLookupError
from twisted.internet.error import TimeoutError as ConnectTimeout
from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from ..http1 import HeadReader, ProtocolError
from ._backend import SPEAKS_HTTP2, BackendPool, BackendSettings, speaks_http2
from ._failures import describe_close
from ._proxyheader import VERSIONS
from ._proxyheader import encode as proxy_header
from .address import BackendAddress, describe_tls_failure


class Policy(enum.Enum):
    """How a route picks a backend for a new request."""

    #: Each backend in turn.
    ROUND_ROBIN = "round-robin"
    #: The backend with the fewest requests in flight and tunnels open: the
    #: default, since a tunnel may hold a backend for hours.
    LEAST_CONN = "least-conn"
    #: The same backend for the same client address, as long as it is healthy.
    CLIENT_HASH = "client-hash"


@dataclass(frozen=True, slots=True)
class HealthCheck:
    """An active health check: ``GET path`` every ``interval`` seconds."""

    path: str = "/"
    interval: float = 10.0
    timeout: float = 5.0
    #: The status a healthy backend answers with.
    expect_status: int = 200


def describe_connect_failure(reason: Failure) -> str:
    """Why a connection attempt failed, in a few words ("Connection refused").

    A TLS failure says what to change (see :func:`~upgradeproxy.core.address.describe_tls_failure`).
    """
    tls = describe_tls_failure(reason)
    if tls is not None:
        return tls
    value = reason.value
    if isinstance(value, ConnectTimeout):
        # Twisted's own words are "User timeout caused connection failure".
        return "no connection within the connect timeout"
    # Twisted puts the system's own words (strerror) in the first argument.
    if isinstance(value, ConnectError) and value.args and value.args[0]:
        return str(value.args[0])
    return reason.getErrorMessage()


def connect_advice(reason: Failure) -> str:
    """What to change after a failed connection; ``""`` when its description says it already.

    A TLS failure's description ends with its own advice.
    """
    if reason.check(ConnectionRefusedError):
        return "check that the backend is running and listens on the host and port of its URL"
    if reason.check(ConnectTimeout):
        return (
            "check that the host is up and that no firewall drops the port, "
            "or raise --connect-timeout"
        )
    if reason.check(DNSLookupError):
        return "check the host name in the backend URL"
    return ""


@dataclass(frozen=True, slots=True)
class FailedConnection:
    """A backend that a request tried and could not connect to, and why."""

    backend: Backend
    why: str
    #: What to change, or "" (see :func:`connect_advice`).
    advice: str = ""
    #: False when the backend was down already, tried as the last resort.
    in_rotation: bool = True

    def explain(self) -> str:
        return f"{self.why}; {self.advice}" if self.advice else self.why


def no_backend_reason(route: str, backends: Sequence[Backend]) -> str:
    """Why a request found no healthy backend: each one that is down, and why."""
    down = "; ".join(f"{b.name}: {b.last_error or 'down'}" for b in backends if not b.healthy)
    return f"no healthy backend for route {route}" + (f" ({down})" if down else "")


def unreachable_answer(
    route: str, backends: Sequence[Backend], tried: Sequence[FailedConnection]
) -> tuple[int, str]:
    """The status and reason for a request whose every connection failed.

    ``tried`` holds each backend the request tried, in order. When the only
    try was a backend already down (every backend was), the answer is the
    503 that the proxy would have given without trying; otherwise a 502
    naming every backend tried.
    """
    first = tried[0]
    if len(tried) == 1 and not first.in_rotation:
        return 503, (
            f"{no_backend_reason(route, backends)}; tried {first.backend.name}, "
            f"down the longest, anyway: {first.explain()}"
        )
    if len(tried) == 1:
        return 502, f"the backend ({first.backend.name}) could not be reached: {first.explain()}"
    each = "; ".join(
        f"{t.backend.name}: {t.why}" + (f" ({t.advice})" if t.advice else "") for t in tried
    )
    return 502, f"none of the {len(tried)} backends tried could be reached ({each})"


class Backend:
    """One backend of a group: its address, its connection pool, its load and health.

    Only its group changes its health; the proxy changes :attr:`active`.
    """

    __slots__ = (
        "_check_error",
        "_clock",
        "_failed_at",
        "_hash_key",
        "_retry_at",
        "_unreachable",
        "active",
        "address",
        "failures",
        "failures_in_a_row",
        "name",
        "pool",
    )

    def __init__(
        self, address: BackendAddress, pool: BackendPool, clock: IReactorTime, hash_key: bytes
    ) -> None:
        self.address = address
        self.name = address.name
        self.pool = pool
        #: Requests in flight plus tunnels open; the proxy counts them.
        self.active = 0
        #: Connections to it that failed, since the start.
        self.failures = 0
        #: Connections to it that failed since the last one that worked.
        self.failures_in_a_row = 0
        self._clock = clock
        self._hash_key = hash_key
        # Why the last connection failed; "" once one succeeds again.
        self._unreachable = ""
        self._retry_at = 0.0
        # When it last failed a connection or a check: the oldest goes first
        # when every backend is down.
        self._failed_at = 0.0
        # Why the last health check failed; "" when it passed or none ran.
        self._check_error = ""

    @property
    def healthy(self) -> bool:
        """True when new requests may go to it.

        False while its last health check failed, and for ``fail_timeout``
        seconds after a connection to it failed.
        """
        if self._check_error:
            return False
        return not self._unreachable or self._clock.seconds() >= self._retry_at

    @property
    def down(self) -> bool:
        """True from a failure until it is known to work again (a connection or check succeeds).

        A down backend is still tried once its ``fail_timeout`` has passed:
        then it is :attr:`healthy` but still down.
        """
        return bool(self._check_error or self._unreachable)

    @property
    def last_error(self) -> str:
        """Why it is not :attr:`healthy`, in words; ``""`` when it is."""
        return "" if self.healthy else self.error

    @property
    def error(self) -> str:
        """Why it is :attr:`down`, in words, even while it is still tried; ``""`` when it is not."""
        return self._check_error or self._unreachable

    def __repr__(self) -> str:
        return f"<Backend {self.name} active={self.active} healthy={self.healthy}>"


class BackendGroup:
    """The backends of one route, the policy that picks among them, and their health."""

    log = Logger()

    def __init__(
        self,
        addresses: Sequence[BackendAddress],
        *,
        policy: Policy,
        clock: IReactorTime,
        settings: BackendSettings,
        fail_timeout: float = 10.0,
        health: HealthCheck | None = None,
        route: str = "",
        send_proxy: str | None = None,
    ) -> None:
        """``send_proxy`` ("v1" or "v2") sends a PROXY protocol header first on every
        connection, naming the client (health checks send ``LOCAL``/``UNKNOWN``)."""
        if not addresses:
            raise ValueError(f"route {route!r} has no backend; give it at least one")
        if health is not None:
            _check_health_path(health.path)
        _check_send_proxy(send_proxy, addresses)
        #: The PROXY protocol version sent to these backends, or None.
        self.send_proxy = send_proxy
        self.policy = policy
        self.route = route
        self.health = health
        self.fail_timeout = fail_timeout
        self._clock = clock
        self.backends = tuple(
            Backend(
                address,
                BackendPool(address.endpoint, clock, settings, tls=address.tls),
                clock,
                key,
            )
            for address, key in zip(addresses, _hash_keys(addresses), strict=True)
        )
        self._only = self.backends[0] if len(self.backends) == 1 else None
        self._pick: Callable[[str, Collection[Backend]], Backend | None] = {
            Policy.ROUND_ROBIN: self._round_robin,
            Policy.LEAST_CONN: self._least_conn,
            Policy.CLIENT_HASH: self._client_hash,
        }[policy]
        # Where the rotation of round robin, and of least-conn's ties, goes on.
        self._next = 0
        self._max_head = settings.max_response_head
        self._checkers: list[_HealthChecker] = []

    # -- choosing ------------------------------------------------------------------

    def choose(self, client: str) -> Backend:
        """The backend for a request's first try: a healthy one, by the policy.

        ``client`` is the client's address without its port, so that all of a
        client's connections hash alike under :attr:`Policy.CLIENT_HASH`.
        When no backend is healthy, the one whose last failure is the oldest,
        as the last resort.
        """
        only = self._only
        if only is not None:
            return only
        found = self._pick(client, ())
        return found if found is not None else min(self.backends, key=_last_failure)

    def choose_retry(self, client: str, tried: Collection[Backend]) -> Backend | None:
        """A healthy backend not in ``tried``, by the policy; None when none is left.

        Never a backend that is down: a request makes one last-resort try
        (see :meth:`choose`), not one per backend.
        """
        return self._pick(client, tried)

    def _rotation(self, exclude: Collection[Backend]) -> Iterator[tuple[int, Backend]]:
        """The usable backends with their indexes, starting where the rotation is."""
        backends = self.backends
        count = len(backends)
        start = self._next
        for step in range(count):
            index = (start + step) % count
            backend = backends[index]
            if backend.healthy and backend not in exclude:
                yield index, backend

    def _round_robin(self, client: str, exclude: Collection[Backend]) -> Backend | None:
        for index, backend in self._rotation(exclude):
            self._next = index + 1
            return backend
        return None

    def _least_conn(self, client: str, exclude: Collection[Backend]) -> Backend | None:
        # min() keeps the first of equals, so the rotation decides ties.
        found = min(self._rotation(exclude), key=lambda pair: pair[1].active, default=None)
        if found is None:
            return None
        index, backend = found
        self._next = index + 1
        return backend

    def _client_hash(self, client: str, exclude: Collection[Backend]) -> Backend | None:
        # Rendezvous hashing: each client ranks the backends by a hash of the
        # pair, so a backend leaving moves only the clients it had. blake2b,
        # not hash(): every worker process must rank alike.
        address = client.encode("utf-8", "surrogateescape")
        best: Backend | None = None
        best_score = b""
        for backend in self.backends:
            if not backend.healthy or backend in exclude:
                continue
            score = hashlib.blake2b(backend._hash_key + address, digest_size=8).digest()
            if score > best_score:
                best, best_score = backend, score
        return best

    # -- passive health --------------------------------------------------------------

    def connect_failed(self, backend: Backend, reason: str) -> None:
        """A connection to ``backend`` failed before any byte was sent.

        It is left out for ``fail_timeout`` seconds, then tried again; the
        only backend of a route is never left out.
        """
        was_down = backend.down
        now = self._clock.seconds()
        backend.failures += 1
        backend.failures_in_a_row += 1
        backend._unreachable = reason
        backend._failed_at = now
        if self._only is not None:
            backend._retry_at = now
            if not was_down:
                self.log.warn(
                    "backend {where} failed: {reason}; it is the route's only backend, "
                    "so it stays in use",
                    where=self._where(backend),
                    backend=backend.name,
                    route=self.route,
                    reason=reason,
                )
            return
        backend._retry_at = now + self.fail_timeout
        if not was_down:
            self.log.warn(
                "backend {where} is down: {reason}; retrying it in {retry:g} seconds",
                where=self._where(backend),
                backend=backend.name,
                route=self.route,
                reason=reason,
                retry=self.fail_timeout,
            )

    def connect_succeeded(self, backend: Backend) -> None:
        """A connection to ``backend`` was made: it works again if it did not."""
        if backend._unreachable:
            backend._unreachable = ""
            backend.failures_in_a_row = 0
            self._maybe_back(backend)

    # -- active health ---------------------------------------------------------------

    def start(self) -> None:
        """Start the health checks (when the group has a :class:`HealthCheck`)."""
        health = self.health
        if health is None or self._checkers:
            return
        header = b"" if self.send_proxy is None else proxy_header(self.send_proxy, None, None)
        self._checkers = [
            _HealthChecker(backend, health, self._clock, self._max_head, self._check_done, header)
            for backend in self.backends
        ]
        for checker in self._checkers:
            checker.start()

    def stop(self) -> None:
        """Stop the health checks, and any check in progress."""
        checkers, self._checkers = self._checkers, []
        for checker in checkers:
            checker.stop()

    def close_idle(self) -> None:
        """Close every idle connection of every backend (at shutdown)."""
        for backend in self.backends:
            backend.pool.close_idle()

    def take_over(self, previous: BackendGroup) -> tuple[Backend, ...]:
        """Put ``previous``'s backends of the same names in place of this group's own.

        For a reload: a backend that stays keeps its health, failure count
        and load (requests in flight and tunnels are counted on it), and takes
        this group's address and connection pool; its old pool is retired.
        Returns the backends taken over. Call it before :meth:`start`.
        """
        assert not self._checkers, "take over backends before the health checks start"
        before: dict[str, list[Backend]] = {}
        for backend in previous.backends:
            before.setdefault(backend.name, []).append(backend)
        taken: list[Backend] = []
        backends: list[Backend] = []
        for new in self.backends:
            same = before.get(new.name)
            if not same:
                backends.append(new)
                continue
            old = same.pop(0)
            old.pool.retire()
            old.address, old.pool, old._hash_key = new.address, new.pool, new._hash_key
            backends.append(old)
            taken.append(old)
        self.backends = tuple(backends)
        self._only = self.backends[0] if len(self.backends) == 1 else None
        return tuple(taken)

    def _check_done(self, backend: Backend, error: str) -> None:
        was_down = backend.down
        backend._check_error = error
        if error:
            backend._failed_at = self._clock.seconds()
            if not was_down:
                self.log.warn(
                    "backend {where} is down: {reason}",
                    where=self._where(backend),
                    backend=backend.name,
                    route=self.route,
                    reason=error,
                )
            return
        # The check connected, so connections work again too.
        backend._unreachable = ""
        backend.failures_in_a_row = 0
        if was_down:
            self._maybe_back(backend)

    # -- log lines -------------------------------------------------------------------

    def _maybe_back(self, backend: Backend) -> None:
        if not backend.down:
            self.log.info(
                "backend {where} is back in use",
                where=self._where(backend),
                backend=backend.name,
                route=self.route,
            )

    def _where(self, backend: Backend) -> str:
        return f"{backend.name} of route {self.route}" if self.route else backend.name


def _last_failure(backend: Backend) -> float:
    return backend._failed_at


def _hash_keys(addresses: Sequence[BackendAddress]) -> Iterator[bytes]:
    """A distinct hashing key per backend: its name, numbered when a name repeats."""
    seen: Counter[str] = Counter()
    for address in addresses:
        repeat = seen[address.name]
        seen[address.name] += 1
        name = address.name if repeat == 0 else f"{address.name}#{repeat}"
        # The NUL keeps "a" + "b1" apart from "ab" + "1".
        yield name.encode("utf-8", "surrogateescape") + b"\0"


def _check_send_proxy(version: str | None, addresses: Sequence[BackendAddress]) -> None:
    if version is None:
        return
    if version not in VERSIONS:
        raise ValueError(f"send_proxy must be one of {', '.join(VERSIONS)}, not {version!r}")
    tls = [address.name for address in addresses if address.tls]
    if tls:
        raise ValueError(
            f"send_proxy cannot be used with https:// backends ({', '.join(tls)}): the "
            "header would have to go before the TLS handshake, which this proxy does not do; "
            "use http:// backends, or no send_proxy"
        )


def _check_health_path(path: str) -> None:
    if not (path.startswith("/") and path.isascii() and path.isprintable() and " " not in path):
        raise ValueError(
            f"health check path {path!r} is not a request path; write one that starts "
            "with / and has no spaces or non-ASCII characters, for example /healthz"
        )


class _HealthProbe(Protocol):
    """One health check connection: send the request, read one response head."""

    def __init__(self, request: bytes, max_head: int) -> None:
        self._request = request
        self._heads = HeadReader.responses(max_head)
        self._buf = bytearray()
        self.connected_once = False
        #: The response's status; fails when none comes.
        self.status: Deferred[int] = Deferred(self._cancel)

    def connectionMade(self) -> None:
        self.connected_once = True
        self.transport.write(self._request)  # type: ignore[union-attr]

    def dataReceived(self, data: bytes) -> None:
        if self.status.called:
            return
        self._buf += data
        try:
            head = self._heads.read(self._buf)
        except ProtocolError as e:
            self.status.errback(e)
            self.transport.abortConnection()  # type: ignore[union-attr]
            return
        if head is None:
            return
        self.status.callback(head.status)
        self.transport.loseConnection()  # type: ignore[union-attr]

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if not self.status.called:
            self.status.errback(reason)

    @property
    def speaks_http2(self) -> bool:
        """True when the backend answered in HTTP/2 instead of with a response head."""
        return speaks_http2(self._buf)

    def _cancel(self, status: Deferred[int]) -> None:
        self.transport.abortConnection()  # type: ignore[union-attr]


class _ProbeFactory(Factory):
    """Builds the one probe of one check, without a log line.

    Not ``connectProtocol``: its factory is noisy, and would log "Starting
    factory" and "Stopping factory" on every probe.
    """

    noisy = False

    def __init__(self, probe: _HealthProbe) -> None:
        self._probe = probe

    def buildProtocol(self, addr: object) -> _HealthProbe:
        return self._probe


class _HealthChecker:
    """The health check of one backend: every ``interval`` seconds, never two at once."""

    log = Logger()

    def __init__(
        self,
        backend: Backend,
        health: HealthCheck,
        clock: IReactorTime,
        max_head: int,
        report: Callable[[Backend, str], None],
        header: bytes = b"",
    ) -> None:
        """``header``: a PROXY protocol header to send before the request."""
        self._backend = backend
        self._health = health
        self._clock = clock
        self._max_head = max_head
        self._report = report
        target = backend.address.prefix + health.path.encode("ascii")
        self._what = f"health check GET {target.decode('ascii')}"
        self._request = header + (
            b"GET %s HTTP/1.1\r\nHost: %s\r\nUser-Agent: upgradeproxy-health-check\r\n"
            b"Connection: close\r\n\r\n" % (target, backend.name.encode("utf-8"))
        )
        # LoopingCall waits for the Deferred a check returns before it plans the next.
        self._loop = LoopingCall(self._check)
        self._loop.clock = clock
        self._in_progress: Deferred[None] | None = None

    def start(self) -> None:
        self._loop.start(self._health.interval, now=True)

    def stop(self) -> None:
        if self._loop.running:
            self._loop.stop()
        if self._in_progress is not None:
            self._in_progress.cancel()

    def _check(self) -> Deferred[None]:
        probe = _HealthProbe(self._request, self._max_head)
        connecting = self._backend.address.endpoint.connect(_ProbeFactory(probe))
        status: Deferred[int] = connecting.addCallback(lambda _: probe.status)
        error = status.addCallbacks(self._judge, self._explain, errbackArgs=(probe,))
        error.addTimeout(self._health.timeout, self._clock, onTimeoutCancel=self._timed_out)
        done = error.addCallback(self._done)
        done.addErrback(self._crashed)
        self._in_progress = done
        return done

    def _judge(self, status: int) -> str:
        expected = self._health.expect_status
        if status == expected:
            return ""
        return f"{self._what} answered {status}, expected {expected}"

    def _explain(self, reason: Failure, probe: _HealthProbe) -> str:
        if not probe.connected_once:
            return f"health check could not connect: {describe_connect_failure(reason)}"
        if probe.speaks_http2:
            return f"{self._what}: {SPEAKS_HTTP2}"
        if isinstance(reason.value, ProtocolError):
            return f"{self._what} got a malformed response: {reason.value.reason}"
        return f"{self._what} got no response: the connection ended ({describe_close(reason)})"

    def _timed_out(self, result: object, timeout: float) -> str:
        # Whatever the cancelled attempt ended with, the timeout is the reason.
        return f"health check timed out after {timeout:g} seconds"

    def _done(self, error: str) -> None:
        self._in_progress = None
        if self._loop.running:
            self._report(self._backend, error)

    def _crashed(self, reason: Failure) -> None:
        # An error here would stop the LoopingCall, and with it the checks.
        self.log.failure("health check of {backend} failed", reason, backend=self._backend.name)
