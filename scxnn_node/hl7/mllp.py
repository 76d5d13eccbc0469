"""MLLP (the minimal lower layer protocol) as a client: each message framed as <VT> message
<FS><CR> on one TCP (or TLS) connection, and the peer's framed reply read back."""

from __future__ import annotations

import socket
import ssl
from collections.abc import Sequence
from dataclasses import dataclass

START = b"\x0b"
END = b"\x1c\r"
MAX_REPLY_BYTES = 1 << 20  # an ACK is a few hundred bytes; more is not an ACK


@dataclass(frozen=True)
class Reply:
    """What came back for one message: the reply's content, or why there was none."""

    content: bytes | None = None
    error: str | None = None


def frame(message: bytes) -> bytes:
    return START + message + END


def _read_reply(connection: socket.socket) -> bytes:
    """One framed reply; ConnectionError when the peer closes first, ValueError when what it
    sends is not MLLP."""
    buffer = b""
    while END not in buffer:
        chunk = connection.recv(4096)
        if not chunk:
            raise ConnectionError("the RIS closed the connection before its ACK ended")
        buffer += chunk
        if len(buffer) > MAX_REPLY_BYTES:
            raise ValueError(f"reply over {MAX_REPLY_BYTES} bytes without an MLLP end")
    start = buffer.find(START)
    if start < 0:
        raise ValueError(f"reply without an MLLP start block: {buffer[:40]!r}")
    return buffer[start + 1 : buffer.index(END, start)]


def exchange(
    host: str,
    port: int,
    messages: Sequence[bytes],
    timeout: float,
    ssl_context: ssl.SSLContext | None = None,
) -> list[Reply]:
    """Send each message and read its reply, in order, on one connection; a reply per message.
    A network failure fails the message in hand and every one after it (not sent)."""
    replies: list[Reply] = []
    try:
        raw = socket.create_connection((host, port), timeout=timeout)
    except OSError as exc:
        return [Reply(error=f"cannot connect to {host}:{port}: {exc}")] * len(messages)
    connection: socket.socket = raw
    try:
        if ssl_context is not None:
            try:
                connection = ssl_context.wrap_socket(raw, server_hostname=host)
            except ssl.SSLError as exc:  # said as such: a certificate problem, not the network
                failure = f"TLS handshake with {host}:{port} failed: {_tls_failure(exc)}"
                return [Reply(error=failure)] * len(messages)
        for message in messages:
            connection.sendall(frame(message))
            replies.append(Reply(content=_read_reply(connection)))
    except TimeoutError:
        replies.append(Reply(error=f"no ACK within {timeout:g}s"))
    except (OSError, ValueError) as exc:
        replies.append(Reply(error=f"{type(exc).__name__}: {exc}"))
    finally:
        connection.close()
    not_sent = Reply(error="not sent: the connection failed on an earlier message")
    return replies + [not_sent] * (len(messages) - len(replies))


def _tls_failure(exc: ssl.SSLError) -> str:
    """Why a handshake failed, in the words of the check that refused it."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"the RIS's certificate was refused: {exc.verify_message}"
    return exc.reason or str(exc)
