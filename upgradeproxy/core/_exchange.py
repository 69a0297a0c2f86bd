"""One request and its answer, whatever front door the client came through.

An :class:`Exchange` applies the proxy's rules to one request: admission
(routes, limits, validators), choosing a backend and retrying another when a
connection fails before any byte was sent, the request body limit, the
backend's answer (interim, final or ``101``), the switch decision, and the
access record. It is the backend connection's
:class:`~upgradeproxy.core._backend.ResponseSink`.

It never touches the client's wire. It talks to its front door through the
small :class:`ClientSide` interface: the HTTP/1.1 connection
(:mod:`upgradeproxy.core._client`), each stream of an HTTP/2 connection
(:mod:`upgradeproxy.core._http2`) and the twisted.web resource
(:mod:`upgradeproxy.web`) each implement it, and each turns the exchange's
calls into bytes, frames or twisted.web calls of its own.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from typing import Protocol

from twisted.logger import Logger
from twisted.python.failure import Failure

from ..http1 import (
    LAST_CHUNK,
    BodyKind,
    Field,
    Framing,
    ProtocolError,
    RequestHead,
    ResponseHead,
    encode_chunk,
    is_upgrade_request,
    request_framing,
)
from ..interfaces import Refusal, UpgradeAttempt
from ._backend import BackendConnection, BackendFailure
from ._clientlimits import Key
from ._handover import Handover
from ._proxyheader import encode as proxy_header
from ._rewrite import ClientHop, request_for_backend, split_target, without_h2c
from ._tunnel import Tunnel
from .accesslog import RequestRecord
from .balancer import (
    Backend,
    FailedConnection,
    connect_advice,
    describe_connect_failure,
    unreachable_answer,
)
from .proxy import Proxy
from .routing import Route, host_name

log = Logger()


class ClientSide(Protocol):
    """What an exchange needs of the front door its client came through.

    Calls come in this order: :meth:`body_wanted` once the backend
    connection is ready (if the request has a body), then either
    :meth:`refuse` (no response head was sent: the door answers with an
    error and closes), or interim heads, one :meth:`send_head`, body data and
    :meth:`send_end`, or :meth:`hand_over` and :meth:`attach` for a switch, or
    :meth:`cut_short` when a response already under way cannot be finished.
    """

    #: The client's address, for logs, balancing and ``X-Forwarded-For``.
    address: str
    #: What the proxy adds to the request about this hop.
    hop: ClientHop
    #: The protocol the client speaks to this door: "HTTP/1.1" or "HTTP/2".
    protocol: str

    def body_wanted(self, exchange: Exchange, backend: BackendConnection) -> None:
        """The backend is ready for the request body: feed it to ``exchange``."""

    def cork(self) -> None:
        """Hold what is sent to the client until :meth:`uncork`."""

    def uncork(self) -> None:
        """Send what was held, at once."""

    def send_interim(self, head: ResponseHead) -> None:
        """Relay a ``1xx`` response (other than ``101``), if the client can take one."""

    def send_head(self, exchange: Exchange, head: ResponseHead, framing: Framing) -> None:
        """Send the final response head; its body (per ``framing``) follows."""

    def send_body(self, data: bytes) -> None:
        """Send response body bytes."""

    def send_trailers(self, fields: tuple[Field, ...]) -> None:
        """The response's trailer fields, just before :meth:`send_end`.

        A door whose client cannot take them drops them.
        """

    def send_end(self, exchange: Exchange) -> None:
        """The response is complete: the connection may serve its next request."""

    def refuse(
        self, exchange: Exchange | None, status: int, reason: str, *, retry_after: int | None = None
    ) -> int:
        """Answer with an error response saying ``reason``, then close.

        ``retry_after`` (seconds) goes in a ``Retry-After`` field when given.
        Returns the number of body bytes sent, for the access record.
        """

    def cut_short(self) -> None:
        """End a response already under way: close the connection."""

    def hand_over(self, response: ResponseHead) -> Handover:
        """Answer the accepted switch (the backend's ``101`` is ``response``), and stop
        serving HTTP: the connection (or stream) is given up to a tunnel."""

    def attach(self, tunnel: Tunnel) -> None:
        """From now on, the connection's events go to ``tunnel``."""

    def abort(self) -> None:
        """Close at once, whatever is in flight."""


def log_error_response(status: int, client: str, reason: str) -> None:
    """The log line of an error response: a warning for 5xx, else info."""
    level = log.warn if status >= 500 else log.info
    level("{status} to {client}: {reason}", status=status, client=client, reason=reason)


def _no_route_reason(head: RequestHead) -> str:
    """Why no route serves ``head``, naming its host and path."""
    path, authority = split_target(head.target)
    host = host_name(authority or head.headers.get(b"host")) or "(none)"
    return (
        f"no route serves host {host} and path {path.decode('latin-1')[:200]}; "
        "the proxy's configuration lists the hosts and paths it serves"
    )


class Exchange:
    """One request from a client and the backend's answer to it."""

    __slots__ = (
        "_attempts",
        "_backend_name",
        "_body_bytes",
        "_client",
        "_client_keys",
        "_proxy",
        "_response_bytes",
        "_status",
        "_tried",
        "backend",
        "body_done",
        "ended",
        "forwarded",
        "framing",
        "request",
        "responded",
        "route",
        "started",
        "upgrade",
        "upstream",
    )

    def __init__(
        self,
        proxy: Proxy,
        client: ClientSide,
        request: RequestHead,
        forwarded: RequestHead,
        framing: Framing,
        upgrade: bool,
        route: Route,
        upstream: Backend,
        client_keys: tuple[Key, ...] = (),
    ) -> None:
        self._proxy = proxy
        self._client = client
        #: Tunnel reservations under the per-client limits, given back when the exchange ends.
        self._client_keys = client_keys
        self.request = request
        self.forwarded = forwarded
        self.framing = framing
        self.upgrade = upgrade
        self.route = route
        self.started = proxy.clock.seconds()
        #: The backend chosen for this request; it counts the request as active.
        self.upstream: Backend | None = upstream
        #: Backends whose connection failed for this request.
        self._tried: list[FailedConnection] | None = None
        self.backend: BackendConnection | None = None
        self._attempts = 0
        self._body_bytes = 0
        #: The backend that answered (or was last tried), for the access record.
        self._backend_name = upstream.name
        #: True once the whole request body went to the backend.
        self.body_done = framing.kind is BodyKind.NONE
        #: True once a response head went to the client.
        self.responded = False
        self._status = 0
        self._response_bytes = 0
        #: True once the exchange is over (answered, refused, switched or abandoned).
        self.ended = False
        upstream.active += 1

    # -- admission ------------------------------------------------------------------

    @classmethod
    def start(cls, proxy: Proxy, client: ClientSide, head: RequestHead) -> Exchange | None:
        """The exchange for ``head``, or None when it was refused through ``client``.

        The front door keeps the exchange, then calls :meth:`connect`.
        """
        if head.method == b"CONNECT":
            refuse_request(
                proxy, client, head, None, 501, "CONNECT is not supported by this reverse proxy"
            )
            return None
        if not proxy.settings.forward_h2c:
            head = without_h2c(head)
        try:
            framing = request_framing(head)
            upgrade = is_upgrade_request(head)
            route = proxy.router.route_for(head)
        except ProtocolError as e:
            refuse_request(proxy, client, None, None, e.status, e.reason)
            return None
        if route is None:
            refuse_request(proxy, client, head, None, 404, _no_route_reason(head))
            return None
        refusal = _admission_refusal(proxy, route, framing, upgrade)
        if refusal is not None:
            refuse_request(proxy, client, head, route, refusal.status, refusal.reason)
            return None
        upstream = route.group.choose(client.address)
        try:
            forwarded = request_for_backend(
                head, client.hop, upgrade=upgrade, framing=framing.kind,
                prefix=upstream.address.prefix,
            )  # fmt: skip
        except ProtocolError as e:
            refuse_request(proxy, client, head, route, e.status, e.reason)
            return None
        if upgrade:
            attempt = UpgradeAttempt(
                head, backend=upstream.name, client=client.address, route=route.name,
                client_protocol=client.protocol,
            )  # fmt: skip
            refusal = proxy.check_request(attempt, route)
            if refusal is not None:
                refuse_request(proxy, client, head, route, refusal.status, refusal.reason)
                return None
            limited, keys = proxy.admit_upgrade(client.address, route)
            if limited is not None:
                refuse_request(
                    proxy, client, head, route, limited.status, limited.reason,
                    retry_after=limited.retry_after, logged=limited.logged,
                )  # fmt: skip
                return None
            return cls(proxy, client, head, forwarded, framing, upgrade, route, upstream, keys)
        return cls(proxy, client, head, forwarded, framing, upgrade, route, upstream)

    # -- the backend connection --------------------------------------------------------

    def connect(self) -> None:
        """Connect to the chosen backend (or take a pooled connection) and send the request."""
        self._attempts += 1
        upstream = self.upstream
        assert upstream is not None
        # A connection that told its backend who the client is serves only
        # that client connection: the header names its address and port.
        version = self.route.group.send_proxy
        header = None
        if version is not None:
            hop = self._client.hop
            header = proxy_header(version, hop.peer, hop.local)
        pooled = upstream.pool.take_idle(header)
        if pooled is not None:
            self._backend_ready(pooled)
            return
        upstream.pool.open(
            partial(self._guarded, self._backend_ready),
            partial(self._guarded, self._backend_unreachable, upstream),
            header=header,
        )

    def _guarded(self, step: Callable[..., None], *args: object) -> None:
        """Run ``step``, called back by a connection attempt: what it raises is the proxy's bug."""
        try:
            step(*args)
        except Exception:
            self._unexpected(Failure())

    def _backend_ready(self, backend: BackendConnection) -> None:
        upstream = self.upstream
        if self.ended or upstream is None:
            # The client went away while we were connecting.
            backend.pool.release(backend)
            return
        if not backend.reused:
            self.route.group.connect_succeeded(upstream)
        self.backend = backend
        backend.send_request(
            self.forwarded.serialize(), self.request.method, self, body=not self.body_done
        )
        if not self.body_done:
            self._client.body_wanted(self, backend)

    def _backend_unreachable(self, upstream: Backend, reason: Failure) -> None:
        """The connection to ``upstream`` failed: no byte of the request was sent.

        So the request may go to another backend of the route, if one is left.
        """
        why = describe_connect_failure(reason)
        group = self.route.group
        failed = FailedConnection(upstream, why, connect_advice(reason), upstream.healthy)
        group.connect_failed(upstream, why)
        if self.ended:
            return
        self._release_upstream()
        tried = self._tried = [*(self._tried or ()), failed]
        retry = group.choose_retry(self._client.address, [t.backend for t in tried])
        if retry is None:
            status, text = unreachable_answer(self.route.name, group.backends, tried)
            if status == 503:
                self._proxy.stats.limit_rejections["no_healthy_backend"] += 1
            self.refuse(status, text)
            return
        log.info(
            "retrying {method} {target} on {retry}: {failed} could not be reached ({why})",
            method=self.request.method.decode("latin-1"),
            target=self.request.target.decode("latin-1"),
            retry=retry.name,
            failed=upstream.name,
            why=why,
        )
        if retry.address.prefix != upstream.address.prefix:
            self.forwarded = request_for_backend(
                self.request, self._client.hop, upgrade=self.upgrade,
                framing=self.framing.kind, prefix=retry.address.prefix,
            )  # fmt: skip
        retry.active += 1
        self.upstream = retry
        self._backend_name = retry.name
        self.connect()

    def _unexpected(self, reason: Failure) -> None:
        log.failure("unexpected error in the proxy", reason)
        if not self.ended:
            self._client.abort()

    def _release_upstream(self) -> None:
        """The exchange no longer occupies its backend."""
        upstream = self.upstream
        if upstream is not None:
            self.upstream = None
            upstream.active -= 1

    # -- the request body (from the front door) -----------------------------------------

    def body_data(self, chunks: Sequence[bytes]) -> bool:
        """Send decoded body ``chunks`` to the backend; False when the body was refused."""
        backend = self.backend
        assert backend is not None
        limit = self.route.max_request_body
        if limit is not None:
            self._body_bytes += sum(map(len, chunks))
            if self._body_bytes > limit:
                self.abandon_backend()
                refusal = _body_over_limit(self._proxy, limit)
                self.refuse(refusal.status, refusal.reason)
                return False
        if self.framing.kind is BodyKind.CHUNKED:
            for chunk in chunks:
                backend.send_body(encode_chunk(chunk))
        else:
            for chunk in chunks:
                backend.send_body(chunk)
        return True

    def body_end(self) -> None:
        """The request body is complete."""
        backend = self.backend
        assert backend is not None
        if self.framing.kind is BodyKind.CHUNKED:
            backend.send_body(LAST_CHUNK)
        backend.end_body()
        self.body_done = True

    # -- the backend's answer (ResponseSink) -----------------------------------------------

    def cork(self) -> None:
        self._client.cork()

    def uncork(self) -> None:
        self._client.uncork()

    def interim_response(self, head: ResponseHead) -> None:
        self._client.send_interim(head)

    def response_head(self, head: ResponseHead, framing: Framing) -> None:
        self.responded = True
        self._status = head.status
        self._client.send_head(self, head, framing)

    def response_body(self, data: bytes) -> None:
        self._response_bytes += len(data)
        self._client.send_body(data)

    def response_trailers(self, fields: tuple[Field, ...]) -> None:
        self._client.send_trailers(fields)

    def response_end(self) -> None:
        self._finish()
        backend = self.backend
        if backend is not None and backend.transport is not None:
            # The client's transport may have paused it as a producer.
            backend.transport.resumeProducing()  # type: ignore[attr-defined]
            if backend.owner is not None and backend.is_idle:
                self._proxy.keep_private(self._client, backend)
        self._client.send_end(self)

    def switch_protocols(self, head: ResponseHead, early_data: bytes) -> None:
        backend, upstream, route = self.backend, self.upstream, self.route
        assert backend is not None and upstream is not None
        client = self._client
        attempt = UpgradeAttempt(
            self.request, head, self.body_done, upstream.name, client.address, route.name,
            client.protocol,
        )  # fmt: skip
        refusal = self._proxy.check_response(attempt, route)
        if refusal is not None:
            self._refuse_switch(attempt, refusal)
            return
        self.ended = True
        # The backend stays busy for as long as the tunnel lives, and so do
        # the client's tunnel reservations.
        self.upstream = None
        keys, self._client_keys = self._client_keys, ()
        self._proxy.start_tunnel(
            attempt,
            route=route,
            upstream=upstream,
            backend=backend,
            early_data=early_data,
            client=client.hand_over(head),
            attach=client.attach,
            client_keys=keys,
        )

    def _refuse_switch(self, attempt: UpgradeAttempt, refusal: Refusal) -> None:
        log.warn(
            "refused the backend's switch for {client} {method} {target}: {reason}",
            client=attempt.client,
            method=attempt.request.method.decode("latin-1"),
            target=attempt.request.target.decode("latin-1"),
            reason=refusal.reason,
        )
        self.abandon_backend()
        self.refuse(502, refusal.reason, quiet=True)

    def backend_failed(self, failure: BackendFailure) -> None:
        if (
            failure.retryable
            and self._attempts == 1
            and self.framing.kind is BodyKind.NONE
            and not self.responded
        ):
            log.debug("retrying on a new backend connection: {reason}", reason=failure.reason)
            self.backend = None
            self.connect()
            return
        if not self.responded:
            self.refuse(failure.status, failure.reason)
            return
        # The response head is already out: there is no way to tell the
        # client but to cut the response short.
        log.warn(
            "response to {client} cut short: {reason}",
            client=self._client.address,
            reason=failure.reason,
        )
        self._finish()
        self._client.cut_short()

    # -- endings ------------------------------------------------------------------------------

    def refuse(self, status: int, reason: str, *, quiet: bool = False) -> None:
        """Answer the client with an error that says what went wrong, and end the exchange.

        A response already under way cannot be followed by an error response
        (it would be read as part of the body): it is cut short instead.
        """
        if self.ended:
            return
        if not quiet:
            log_error_response(status, self._client.address, reason)
        if self.responded:
            self._finish()
            self._client.cut_short()
            return
        self._end()
        sent = self._client.refuse(self, status, reason)
        self._record(status, sent)

    def client_gone(self) -> None:
        """The client connection is gone, or its request cannot be completed."""
        self.abandon_backend()
        self._end()

    def abandon_backend(self) -> None:
        """Let go of the backend connection: it is closed, never reused."""
        backend = self.backend
        self.backend = None
        if backend is not None:
            backend.abandon()

    def _end(self) -> None:
        self.ended = True
        self._release_upstream()
        if self._client_keys:
            keys, self._client_keys = self._client_keys, ()
            self._proxy.release_client(keys)

    def _finish(self) -> None:
        """A response went to the client (whole or cut short): record it."""
        self._end()
        self._record(self._status, self._response_bytes)

    def _record(self, status: int, sent: int) -> None:
        proxy = self._proxy
        request = self.request
        client = self._client
        record_request(
            proxy, client.address, request, self.route, status, sent,
            proxy.clock.seconds() - self.started, self._backend_name, client.protocol,
        )  # fmt: skip


def _admission_refusal(
    proxy: Proxy, route: Route, framing: Framing, upgrade: bool
) -> Refusal | None:
    """The limit that turns a request away before any backend is contacted, if any."""
    if upgrade:
        why = proxy.tunnel_refusal()
        if why is not None:
            return Refusal(why, 503)
    limit = route.max_request_body
    if limit is not None and framing.kind is BodyKind.LENGTH and framing.length > limit:
        return _body_over_limit(proxy, limit)
    return None


def _body_over_limit(proxy: Proxy, limit: int) -> Refusal:
    """The 413 for a body over the route's limit (declared, or found while it streams), counted."""
    proxy.stats.limit_rejections["max_request_body"] += 1
    return Refusal(f"the request body is larger than this route's limit of {limit} bytes", 413)


def refuse_request(
    proxy: Proxy,
    client: ClientSide,
    request: RequestHead | None,
    route: Route | None,
    status: int,
    reason: str,
    *,
    retry_after: int | None = None,
    logged: bool = False,
) -> None:
    """Refuse a request before any exchange started: log (unless ``logged``), answer, record."""
    if not logged:
        log_error_response(status, client.address, reason)
    sent = client.refuse(None, status, reason, retry_after=retry_after)
    if request is not None:
        record_request(
            proxy, client.address, request, route, status, sent, 0.0, "-", client.protocol
        )


def record_request(
    proxy: Proxy,
    client: str,
    request: RequestHead,
    route: Route | None,
    status: int,
    sent: int,
    duration: float,
    backend: str,
    protocol: str = "HTTP/1.1",
) -> None:
    """Count and log one answered request.

    ``protocol`` is the client's door: an HTTP/1.x request is recorded with
    its own version, any other with the door's protocol (``HTTP/2``).
    """
    version = request.version
    proxy.request_done(
        route,
        RequestRecord(
            client=client,
            method=request.method.decode("latin-1"),
            target=request.target.decode("latin-1"),
            version=f"HTTP/{version[0]}.{version[1]}" if protocol == "HTTP/1.1" else protocol,
            status=status,
            bytes=sent,
            duration=duration,
            route=route.name if route is not None else "-",
            backend=backend,
        ),
    )
