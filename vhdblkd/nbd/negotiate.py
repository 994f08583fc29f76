"""The socket side of the handshake: which exports a listener offers, STARTTLS, the chosen session.

`Catalog` is what a listening server offers every client: its exports (the
first is the default, answered to the empty name), the TLS policy and
whether the transmission side speaks structured replies.  `negotiate()`
drives `ServerHandshake` over a connected socket and returns the `Session`
the transmission loop serves, or None when the client left without choosing.
"""

from __future__ import annotations

import dataclasses
import logging
import socket
import ssl
import threading
from collections.abc import Sequence

from ..errors import ConfigError, RemoteProtocolError
from .export import Export
from .handshake import ServerHandshake, State, TlsMode
from .tls import TlsConfig, start_relay, wrap

log = logging.getLogger(__name__)

NO_TLS = TlsConfig(TlsMode.OFF)


@dataclasses.dataclass(frozen=True)
class Catalog:
    exports: tuple[Export, ...]
    tls: TlsConfig = NO_TLS
    structured: bool = True  # offer NBD_OPT_STRUCTURED_REPLY (and with it block status)

    def __post_init__(self) -> None:
        if not self.exports:
            raise ConfigError("a server needs at least one export")
        names = [export.name for export in self.exports]
        if len(set(names)) != len(names):
            raise ConfigError(f"export names must differ: {sorted(names)}")

    @classmethod
    def of(cls, exports: Export | Sequence[Export], **kwargs: object) -> Catalog:
        listed = (exports,) if isinstance(exports, Export) else tuple(exports)
        return cls(listed, **kwargs)  # type: ignore[arg-type]  # the keywords are the fields'

    def by_name(self) -> dict[str, Export]:
        return {export.name: export for export in self.exports}


@dataclasses.dataclass
class Session:
    """A negotiated connection: the socket to serve (a TLS relay's plain end) and what was agreed."""

    sock: socket.socket
    export: Export
    structured: bool = False
    contexts: dict[int, str] = dataclasses.field(default_factory=dict)
    relay: threading.Thread | None = None  # the TLS pump, when `sock` is its plain end


def negotiate(sock: socket.socket, catalog: Catalog) -> Session | None:
    """Run the handshake on `sock`; the session chosen, or None when the client left or aborted.

    A failed TLS handshake (a client without an acceptable certificate) is
    logged and ends the connection, as proto.md requires once STARTTLS was
    acknowledged.
    """
    exports = catalog.by_name()
    hs = ServerHandshake(
        {name: export.info() for name, export in exports.items()},
        default=catalog.exports[0].name,
        structured=catalog.structured,
        tls=catalog.tls.mode,
    )
    io: socket.socket = sock
    tls: ssl.SSLSocket | None = None
    try:
        io.sendall(hs.greeting())
        while hs.state in (State.CLIENT_FLAGS, State.OPTIONS, State.TLS_UPGRADE):
            if hs.state is State.TLS_UPGRADE:
                assert catalog.tls.context is not None  # TlsMode.OFF never acknowledges STARTTLS
                try:
                    tls = wrap(sock, catalog.tls.context)
                except (ssl.SSLError, OSError) as exc:
                    log.warning("TLS handshake with the NBD client failed: %s", exc)
                    return None
                io = tls
                hs.tls_ready()
                continue
            # Read exactly what completes the next message so no transmission or TLS bytes are swallowed.
            out = hs.feed(io.recv(hs.next_read_size))
            if out:
                io.sendall(out)
        if hs.state is State.ERROR:
            hs.feed(b"")  # raises the error that was deferred behind replies already sent
        if hs.state is not State.TRANSMISSION:
            return None
        assert hs.export is not None and not hs.trailing_data  # exact reads leave nothing behind
        export = exports.get(hs.export.name, catalog.exports[0])
        session = Session(sock, export, hs.structured, dict(hs.meta_contexts))
        if tls is not None:
            session.sock, session.relay = start_relay(tls)
            tls = None  # the relay owns it now
        return session
    except ssl.SSLError as exc:
        raise RemoteProtocolError(f"TLS failed during option haggling: {exc}") from exc
    finally:
        if tls is not None:
            tls.close()
