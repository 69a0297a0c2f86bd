"""Zero-copy tunnels on Linux: ``splice(2)`` through one pipe per direction.

When both connections of a tunnel are plain TCP (or UNIX) sockets, the bytes
need not pass through Python at all: the kernel moves them from one socket
into a pipe and from the pipe into the other socket. :class:`SplicePump`
takes both sockets away from their Twisted transports for the life of the
tunnel, drives them with two small reactor descriptors, and hands them back
at the end, so that closing goes through Twisted as usual and the protocols
see ``connectionLost``.

Like the Python relay it never parses and never writes HTTP. Flow control is
the pipe: a direction reads only when its pipe is empty, so a slow reader
stops the writer with at most one pipe of bytes in flight. Empty pipes are
shared by all tunnels, so an idle tunnel holds no pipe at all. ``SPLICE_F_MORE``
is never used: it corks small messages.
"""

from __future__ import annotations

import errno
import os
import socket
import sys
from collections.abc import Callable, Mapping

from twisted.internet import error, tcp
from twisted.internet.interfaces import (
    IReactorFDSet,
    IReadDescriptor,
    ISSLTransport,
    ITransport,
    IWriteDescriptor,
)
from twisted.python.failure import Failure
from zope.interface import implementer

from .._twisted import hand_over_reads, take_pending_output, writes_open
from ._side import ByteCounts, Side

AVAILABLE = sys.platform.startswith("linux") and hasattr(os, "splice")

#: Bytes moved per splice call, and the pipe size asked for.
PIPE_SIZE = 256 * 1024
#: Splice calls per direction per reactor wake-up, so one busy tunnel
#: cannot starve the others.
_ROUNDS = 8
_FLAGS = (os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK) if AVAILABLE else 0


def can_splice(transport: ITransport) -> bool:
    """True when ``transport`` is a connected plain socket this module can drive."""
    return (
        AVAILABLE
        and isinstance(transport, tcp.Connection)
        and not ISSLTransport.providedBy(transport)
        and bool(transport.connected)
        and not transport.disconnecting
        and writes_open(transport)
    )


class _PipePool:
    """Empty pipes, shared by every tunnel of the process.

    A direction holds a pipe only while bytes are in it, so an idle tunnel
    costs no descriptors beyond its two sockets, and a busy process reuses a
    few pipes instead of creating two per tunnel.
    """

    def __init__(self, keep: int = 64) -> None:
        self._free: list[tuple[int, int]] = []
        self._keep = keep

    def take(self) -> tuple[int, int] | None:
        """An empty pipe, or ``None`` when no descriptor is left for one."""
        if self._free:
            return self._free.pop()
        try:
            return _new_pipe()
        except OSError:
            return None

    def give_back(self, pipe: tuple[int, int]) -> None:
        """Return an *empty* pipe."""
        if len(self._free) < self._keep:
            self._free.append(pipe)
        else:
            _close_pipe(pipe)


_pipes = _PipePool()


def _close_pipe(pipe: tuple[int, int]) -> None:
    for fd in pipe:
        os.close(fd)


def _describe(e: OSError) -> str:
    if e.errno in (errno.ECONNRESET, errno.EPIPE):
        return "connection lost (reset)"
    return e.strerror or str(e)


class _Direction:
    """Bytes flowing from one socket to the other."""

    __slots__ = (
        "blocked", "done", "drained", "dst", "eof", "in_pipe", "pending", "pipe", "source", "src",
    )  # fmt: skip

    def __init__(self, source: Side, src: _Socket, dst: _Socket, pending: bytes) -> None:
        self.source = source
        self.src = src
        self.dst = dst
        self.pending = pending
        self.pipe: tuple[int, int] | None = None
        self.in_pipe = 0
        self.eof = False
        self.done = False
        self.blocked = False  # waiting for dst to become writable
        # The last read was short: src had no more at that moment.
        self.drained = False

    def leftover(self) -> bytes:
        """Everything not yet delivered to dst; the pipe goes back to the pool."""
        data = [self.pending]
        self.pending = b""
        if self.pipe is not None:
            while self.in_pipe > 0:
                try:
                    chunk = os.read(self.pipe[0], self.in_pipe)
                except OSError:
                    break
                if not chunk:
                    break
                data.append(chunk)
                self.in_pipe -= len(chunk)
            if self.in_pipe:
                _close_pipe(self.pipe)  # not empty: nobody else may have it
            else:
                _pipes.give_back(self.pipe)
            self.pipe = None
        return b"".join(data)


@implementer(IReadDescriptor, IWriteDescriptor)
class _Socket:
    """One socket of the tunnel, as the reactor sees it while splicing.

    The reactor calls ``logPrefix`` and ``doRead`` for every message a tunnel
    carries: they do nothing but what they must.
    """

    __slots__ = ("fd", "pump", "reading", "reads_into", "side", "sock", "transport", "writes_for")

    def __init__(self, pump: SplicePump, side: Side, transport: tcp.Connection) -> None:
        self.pump = pump
        self.side = side
        self.transport = transport
        self.sock: socket.socket = transport.socket
        self.fd = self.sock.fileno()
        #: True while the reactor watches it for reads: asking again, once per
        #: message, would cost three calls for nothing.
        self.reading = False
        #: The direction this socket's bytes go, and the one that writes to it.
        self.reads_into: _Direction
        self.writes_for: _Direction

    def fileno(self) -> int:
        return self.fd

    def logPrefix(self) -> str:
        return _PREFIXES[self.side]

    def doRead(self) -> None:
        self.pump.readable(self.reads_into)

    def doWrite(self) -> None:
        self.pump.writable(self.writes_for)

    def connectionLost(self, reason: Failure) -> None:
        # Only reached if the reactor itself drops the descriptor.
        self.pump.fail(self.side, reason.getErrorMessage())


#: Shared by every tunnel: a string per socket would be kept for its whole life.
_PREFIXES = {side: f"splice-{side.value}" for side in Side}


class SplicePump:
    """Moves a tunnel's bytes with ``splice(2)`` until both directions end.

    An idle tunnel keeps its pump for as long as it lives, so the pump keeps
    little: its two directions, which know their sockets, which know their
    transports.
    """

    __slots__ = ("_finished", "_note_end", "_reactor", "_sent", "_to")

    def __init__(
        self,
        transports: Mapping[Side, tcp.Connection],
        sent: ByteCounts,
        note_end: Callable[[Side, str], None],
        reactor: IReactorFDSet,
    ) -> None:
        """Take both ``transports``' sockets over from the reactor.

        ``sent`` counts the bytes moved from each side; ``note_end`` is told
        when a side stops sending (EOF) or fails.
        """
        self._sent = sent
        self._note_end = note_end
        self._reactor = reactor
        sockets = {side: _Socket(self, side, transport) for side, transport in transports.items()}
        #: The direction whose bytes go to each side.
        self._to: dict[Side, _Direction] = {}
        for side, transport in transports.items():
            transport.stopWriting()
            sock = sockets[side]
            sock.reading = hand_over_reads(reactor, transport, sock)
            if not sock.reading:
                transport.stopReading()
            # Bytes already buffered for ``side`` go out first.
            self._to[side] = _Direction(
                side.peer, sockets[side.peer], sockets[side], take_pending_output(transport)
            )
        for side, sock in sockets.items():
            sock.reads_into = self._to[side.peer]
            sock.writes_for = self._to[side]
        self._finished = False

    def start(self) -> None:
        for direction in self._to.values():
            self._move(direction)

    # -- reactor events ---------------------------------------------------------------

    def readable(self, direction: _Direction) -> None:
        """``direction``'s source socket is readable."""
        direction.drained = False
        self._move(direction)

    def writable(self, direction: _Direction) -> None:
        """``direction``'s destination socket is writable."""
        direction.blocked = False
        self._reactor.removeWriter(direction.dst)
        self._move(direction)

    # -- moving bytes ---------------------------------------------------------------------

    def _move(self, d: _Direction) -> None:
        flags = _FLAGS
        for _ in range(_ROUNDS):
            if self._finished or d.done:
                return
            if d.pending:
                try:
                    sent = d.dst.sock.send(d.pending)
                except BlockingIOError:
                    self._wait_for_dst(d)
                    return
                except OSError as e:
                    self.fail(d.dst.side, _describe(e))
                    return
                d.pending = d.pending[sent:]
                continue
            if d.in_pipe:
                assert d.pipe is not None
                try:
                    moved = os.splice(d.pipe[0], d.dst.fd, d.in_pipe, flags=flags)
                except BlockingIOError:
                    self._wait_for_dst(d)
                    return
                except OSError as e:
                    self.fail(d.dst.side, _describe(e))
                    return
                d.in_pipe -= moved
                if not d.in_pipe:
                    _pipes.give_back(d.pipe)
                    d.pipe = None
                continue
            if d.eof:
                self._direction_done(d)
                return
            if d.drained:
                # Another read now would most likely fail with EAGAIN (a
                # system call and an exception for nothing): wait for the
                # reactor to say src is readable; it is level-triggered.
                self._watch_reads(d.src)
                return
            try:
                moved = self._read(d, flags)
            except BlockingIOError:
                self._watch_reads(d.src)
                return
            except OSError as e:
                self.fail(d.src.side, _describe(e))
                return
            if moved == 0:
                d.eof = True
                self._unwatch_reads(d.src)
                self._note_end(d.source, "EOF")
            else:
                self._sent.add(d.source, moved)
                d.drained = moved < PIPE_SIZE
        self._out_of_rounds(d)

    def _out_of_rounds(self, d: _Direction) -> None:
        """Come back later for what ``d`` still has to do.

        Bytes already read must not wait for src to have more (it may have no
        more), so they wait for dst instead, which is usually writable at once.
        """
        if d.pending or d.in_pipe:
            self._wait_for_dst(d)
        elif d.eof:
            self._direction_done(d)  # an EOF read in the last round ends it now
        else:
            self._watch_reads(d.src)

    def _watch_reads(self, sock: _Socket) -> None:
        if not sock.reading:
            sock.reading = True
            self._reactor.addReader(sock)

    def _unwatch_reads(self, sock: _Socket) -> None:
        if sock.reading:
            sock.reading = False
            self._reactor.removeReader(sock)

    def _read(self, d: _Direction, flags: int) -> int:
        """Move what src has into a pipe (or, with no descriptor left, into memory)."""
        pipe = _pipes.take()
        if pipe is None:
            data = d.src.sock.recv(PIPE_SIZE)
            d.pending = data
            return len(data)
        try:
            moved = os.splice(d.src.fd, pipe[1], PIPE_SIZE, flags=flags)
        except BaseException:
            _pipes.give_back(pipe)  # still empty
            raise
        if moved:
            d.pipe = pipe
            d.in_pipe = moved
        else:
            _pipes.give_back(pipe)
        return moved

    def _wait_for_dst(self, d: _Direction) -> None:
        d.blocked = True
        self._unwatch_reads(d.src)
        self._reactor.addWriter(d.dst)

    def _direction_done(self, d: _Direction) -> None:
        d.done = True
        if all(direction.done for direction in self._to.values()):
            self._finish(None, "")
            return
        try:
            d.dst.sock.shutdown(socket.SHUT_WR)
        except OSError as e:
            self.fail(d.dst.side, _describe(e))

    # -- endings --------------------------------------------------------------------------

    def fail(self, side: Side, why: str) -> None:
        """``side`` failed: close it, and close the other after flushing what it is owed."""
        self._note_end(side, why)
        self._finish(side, why)

    def close(self) -> None:
        """Close both connections from the proxy's side."""
        self._finish(None, "")

    def _finish(self, failed: Side | None, why: str) -> None:
        """Hand both sockets back to their Twisted transports, which close them."""
        if self._finished:
            return
        self._finished = True
        for direction in self._to.values():
            sock = direction.dst
            # Whatever the flag says: a descriptor left registered would keep
            # its number from ever being watched for the next socket to get it.
            sock.reading = False
            self._reactor.removeReader(sock)
            self._reactor.removeWriter(sock)
        lost = None
        done = []
        for direction in self._to.values():
            owed = direction.leftover()
            transport = direction.dst.transport
            if direction.dst.side is failed:
                lost = transport
                continue
            if owed:
                transport.write(owed)
                transport.loseConnection()
            else:
                done.append(transport)
        # A socket with nothing left to send is closed now, as Twisted itself
        # closes one whose writes are shut down: loseConnection would register
        # it for writing only to find nothing to write on the next turn. Each
        # is marked as closing first, so that the first one's connectionLost
        # does not start a loseConnection on the other.
        for transport in done:
            transport.disconnecting = True
        for transport in done:
            transport.connectionLost(Failure(error.ConnectionDone()))
        if lost is not None:
            lost.connectionLost(Failure(error.ConnectionLost(why)))


def _new_pipe() -> tuple[int, int]:
    read_end, write_end = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        import fcntl

        fcntl.fcntl(write_end, fcntl.F_SETPIPE_SZ, PIPE_SIZE)
    except (ImportError, AttributeError, OSError):
        pass  # the default size (usually 64 KiB) works, a little slower
    return read_end, write_end
