"""The connection rules under uvicorn's h11 protocol (issues 8.9, 22.6): at most a number of
connections at once, a request head within REQUEST_HEAD_SECONDS of opening (or of the previous
response), a body that keeps coming at MIN_BODY_RATE after that grace, and TCP_NODELAY. Imported
only when a server starts (it imports uvicorn and h11)."""

from __future__ import annotations

import socket
import time

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from ..host.console import say

# Connections (issue 8.9): at most MAX_CONNECTIONS open at once (more are closed at once, with
# one log line a minute); a connection must deliver a complete request head within
# REQUEST_HEAD_SECONDS of opening (or of its previous response); idle keep-alive ones close after
# KEEPALIVE_IDLE_SECONDS.
MAX_CONNECTIONS = 512
REQUEST_HEAD_SECONDS = 10.0
KEEPALIVE_IDLE_SECONDS = 5
# A request body must keep coming (issue 22.6): after REQUEST_HEAD_SECONDS of grace it must
# have arrived at MIN_BODY_RATE bytes a second on average, else the connection is closed (a body
# trickled at 1 byte a second would otherwise hold a connection and a handler for ever).
MIN_BODY_RATE = 1024


def protocol_class(max_connections: int) -> type:
    """GuardedH11Protocol for one server: its limit, and its own table of waiting connections."""
    return type("GuardedH11Protocol", (GuardedH11Protocol,),
                {"max_connections": max_connections, "waiting": {}, "refused": {"last": 0.0}})


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with the connection rules (protocol_class sets the limit).
    Connections waiting for a request head are kept oldest first: when the limit is reached,
    the oldest of them makes room for the newcomer (a flood of slow connections cannot lock real
    clients out); only when every connection is busy with a request is the newcomer refused."""

    max_connections = 512
    waiting: dict = {}
    refused = {"last": 0.0}
    _head_timer = None

    def connection_made(self, transport):
        super().connection_made(transport)
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            # A response goes out in several writes (head, body; each streamed token): with
            # Nagle's algorithm the second waits for the client's delayed ACK, 40 ms on
            # Linux, on every keep-alive request and token. (asyncio's transports set it,
            # but only on sockets they see as TCP; measured here: 44 ms a /health without.)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if len(self.connections) > self.max_connections:
            victim = next((c for c in self.waiting if c is not self), None)
            now = time.monotonic()
            if now - self.refused["last"] > 60:
                self.refused["last"] = now
                say(f"note: more than {self.max_connections} connections at once; closing the idlest "
                     "(one line a minute)")
            if victim is None:
                transport.abort()
                return
            self.waiting.pop(victim, None)
            victim.transport.abort()
        self._arm_head_timer()

    def _arm_head_timer(self):
        if self._head_timer is None:
            self._head_timer = self.loop.call_later(REQUEST_HEAD_SECONDS, self._head_timeout)
            self.waiting[self] = None

    def _disarm_head_timer(self):
        self.waiting.pop(self, None)
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timeout(self):
        self._head_timer = None
        self.waiting.pop(self, None)
        if self.cycle is None or self.cycle.response_complete:
            self.transport.close()  # a request head that never came (slowloris)

    def data_received(self, data):
        if self.cycle is None or self.cycle.response_complete:
            self._arm_head_timer()
        super().data_received(data)
        if self.cycle is not None and not self.cycle.response_complete:
            self._disarm_head_timer()
            self._watch_body(len(data))

    _body_since = None
    _body_bytes = 0
    _body_timer = None

    def _watch_body(self, n: int):
        """While a request's body is still coming, it must keep MIN_BODY_RATE after the grace."""
        if self.conn.their_state is not h11.SEND_BODY:
            self._body_since = None
            if self._body_timer is not None:
                self._body_timer.cancel()
                self._body_timer = None
            return
        if self._body_since is None:
            self._body_since, self._body_bytes = time.monotonic(), 0
        self._body_bytes += n
        if self._body_timer is None:
            self._body_timer = self.loop.call_later(self._body_time_left(), self._body_check)

    def _body_time_left(self) -> float:
        allowed = REQUEST_HEAD_SECONDS + self._body_bytes / MIN_BODY_RATE
        return max(0.05, self._body_since + allowed - time.monotonic())

    def _body_check(self):
        self._body_timer = None
        if self._body_since is None or self.transport.is_closing() or self.conn.their_state is not h11.SEND_BODY:
            return
        left = self._body_time_left()
        if left > 0.05:
            self._body_timer = self.loop.call_later(left, self._body_check)
            return
        self.transport.close()  # a body trickled too slowly: the handler sees a disconnect

    def on_response_complete(self):
        super().on_response_complete()
        if not self.transport.is_closing() and (self.cycle is None or self.cycle.response_complete):
            self._arm_head_timer()  # idle between requests: the next head is due in time too

    def connection_lost(self, exc):
        self._disarm_head_timer()
        if self._body_timer is not None:
            self._body_timer.cancel()
            self._body_timer = None
        super().connection_lost(exc)
