"""TLS for network exports, with the standard library's `ssl` (X.509 only).

`server_context()` builds the server's context: a certificate and key, and
with a CA, client certificates are required and verified (a client without
one fails the TLS handshake).  PSK is not offered: Python's `ssl` has no
server-side PSK callback before 3.13.

After STARTTLS the connection is relayed: `start_relay()` hands the
transmission loop a plain socketpair end and moves bytes between it and the
TLS socket in one thread.  That keeps every OpenSSL call on one thread (an
SSL object must not be read and written from two threads at once, and the
transmission loop replies from a flush thread too) and lets the loop keep
using `recv_into(MSG_WAITALL)` and `sendmsg`, which `SSLSocket` lacks.
"""

from __future__ import annotations

import dataclasses
import logging
import selectors
import socket
import ssl
import threading

from ..errors import ConfigError
from .handshake import TlsMode

log = logging.getLogger(__name__)

HANDSHAKE_TIMEOUT = 30.0  # seconds a client may take over the TLS handshake
_CHUNK = 256 * 1024
_HIGH_WATER = 4 * 1024 * 1024  # stop reading a side while this much waits to go the other way


@dataclasses.dataclass(frozen=True, slots=True)
class TlsConfig:
    mode: TlsMode
    context: ssl.SSLContext | None = None

    def __post_init__(self) -> None:
        if (self.mode is TlsMode.OFF) != (self.context is None):
            raise ConfigError("TLS on or require needs a certificate and key (--tls-cert, --tls-key)")


def server_context(cert: str, key: str, ca: str | None = None) -> ssl.SSLContext:
    """A TLS 1.2+ server context; with `ca` every client must present a certificate it signed."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"--tls-cert {cert} / --tls-key {key}: cannot load: {exc}") from exc
    if ca is not None:
        try:
            ctx.load_verify_locations(cafile=ca)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"--tls-ca {ca}: cannot load: {exc}") from exc
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def wrap(sock: socket.socket, context: ssl.SSLContext) -> ssl.SSLSocket:
    """Run the server side of the TLS handshake on a duplicate of `sock`.

    A duplicate, because wrapping takes the descriptor over: the caller's
    socket stays valid for its own shutdown() and close().  Raises
    `ssl.SSLError` or `OSError` when the handshake fails.
    """
    dup = socket.socket(sock.family, sock.type, sock.proto, fileno=sock.dup().detach())
    try:
        dup.settimeout(HANDSHAKE_TIMEOUT)
        tls = context.wrap_socket(dup, server_side=True)
    except BaseException:
        dup.close()
        raise
    tls.settimeout(None)
    return tls


def start_relay(tls: ssl.SSLSocket) -> tuple[socket.socket, threading.Thread]:
    """Return the plain end the transmission loop uses, and the relay thread serving it."""
    plain, inner = socket.socketpair()
    thread = threading.Thread(target=_relay, args=(tls, inner), name="nbd-tls", daemon=True)
    thread.start()
    return plain, thread


def _relay(tls: ssl.SSLSocket, inner: socket.socket) -> None:
    try:
        _Relay(tls, inner).run()
    except (ssl.SSLError, OSError) as exc:
        log.info("TLS connection ended: %s", exc)
    finally:
        for sock in (inner, tls):
            try:
                sock.close()
            except OSError as exc:
                log.debug("closing a TLS relay socket: %s", exc)


class _Relay:
    """Non-blocking pump between a TLS socket and a plain one, on one thread."""

    def __init__(self, tls: ssl.SSLSocket, inner: socket.socket) -> None:
        self.tls = tls
        self.inner = inner
        self.to_inner = bytearray()  # decrypted, for the transmission loop
        self.to_tls = bytearray()  # replies, to encrypt
        self.tls_eof = False
        self.inner_eof = False
        self.inner_shut = False
        self.tls_wants: int = selectors.EVENT_READ  # what the last blocked TLS call waits for

    def run(self) -> None:
        self.tls.setblocking(False)
        self.inner.setblocking(False)
        with selectors.DefaultSelector() as sel:
            while True:
                progressed = self._step()
                if self.inner_eof and not self.to_tls:
                    self._close_notify()
                    return  # the loop is done and every reply is out
                if self.tls_eof and not self.to_inner and not self.inner_shut:
                    self.inner.shutdown(socket.SHUT_WR)  # the loop sees EOF and answers what it has
                    self.inner_shut = True
                    progressed = True
                if progressed:
                    continue
                self._wait(sel)

    def _close_notify(self) -> None:
        """Say goodbye in TLS so clients do not report a truncated session (best effort)."""
        if self.tls_eof:
            return
        try:
            self.tls.settimeout(1.0)
            self.tls.unwrap()
        except (ssl.SSLError, OSError, ValueError) as exc:
            log.debug("TLS close_notify: %s", exc)

    def _step(self) -> bool:
        progressed = False
        if not self.tls_eof and len(self.to_inner) < _HIGH_WATER:
            progressed |= self._tls_recv()
        if self.to_inner:
            try:
                n = self.inner.send(self.to_inner)
                del self.to_inner[:n]
                progressed = True
            except BlockingIOError:
                pass
        if not self.inner_eof and len(self.to_tls) < _HIGH_WATER:
            try:
                data = self.inner.recv(_CHUNK)
                if data:
                    self.to_tls += data
                else:
                    self.inner_eof = True
                progressed = True
            except BlockingIOError:
                pass
        if self.to_tls:
            try:
                n = self.tls.send(self.to_tls[:_CHUNK])
                del self.to_tls[:n]
                progressed = True
            except ssl.SSLWantWriteError:
                self.tls_wants = selectors.EVENT_WRITE
            except ssl.SSLWantReadError:
                self.tls_wants = selectors.EVENT_READ
        return progressed

    def _tls_recv(self) -> bool:
        try:
            data = self.tls.recv(_CHUNK)
        except ssl.SSLWantReadError:
            self.tls_wants = selectors.EVENT_READ
            return False
        except ssl.SSLWantWriteError:
            self.tls_wants = selectors.EVENT_WRITE
            return False
        except (ssl.SSLEOFError, ConnectionResetError):
            data = b""  # a client that hangs up without close_notify
        if data:
            self.to_inner += data
        else:
            self.tls_eof = True
        return True

    def _wait(self, sel: selectors.BaseSelector) -> None:
        for key in list(sel.get_map().values()):
            sel.unregister(key.fileobj)
        tls_events = 0
        if (not self.tls_eof and len(self.to_inner) < _HIGH_WATER) or self.to_tls:
            tls_events = self.tls_wants
            if self.to_tls and self.tls_wants == selectors.EVENT_READ and not self.tls_eof:
                tls_events |= selectors.EVENT_WRITE
        inner_events = 0
        if self.to_inner:
            inner_events |= selectors.EVENT_WRITE
        if not self.inner_eof and len(self.to_tls) < _HIGH_WATER:
            inner_events |= selectors.EVENT_READ
        if tls_events:
            sel.register(self.tls, tls_events)
        if inner_events:
            sel.register(self.inner, inner_events)
        if not tls_events and not inner_events:
            raise OSError("TLS relay has nothing to wait for")  # unreachable: one side always has work
        sel.select()
