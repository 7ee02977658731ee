"""The labkit daemon's wire format, on its Unix socket: frames of a 4-byte big-endian length and that
many bytes of UTF-8 JSON (an object). A request is one frame, ``{"op": ..., "args": {...}}``, with the
caller's stdin, stdout and stderr attached to it (SCM_RIGHTS) for ``exec`` only. Replies are zero or
more ``{"event": "progress", "text": ...}`` frames and one final ``{"done": true, "exit": N, ...}``.

Everything read is bounded: a frame's length before it is read (:data:`MAX_REQUEST` for requests),
the time a whole request may take to arrive, the number of descriptors; a frame that breaks any of it
is a :class:`ProtocolError`, never a half-read request acted on.
"""

from __future__ import annotations

import json
import os
import socket
import struct
import time

HEADER = struct.Struct("!I")
MAX_REQUEST = 1 << 20  # 1 MiB: a spec of hundreds of pods and services fits many times over
MAX_REPLY = 64 << 20  # a check of a big lab, a long service listing
MAX_FDS = 3


class ProtocolError(Exception):
    """A frame that cannot be a request or reply (too long, cut short, not a JSON object, too slow)."""


def send(sock: socket.socket, obj: dict, fds: tuple[int, ...] = ()) -> None:
    data = json.dumps(obj, separators=(",", ":"), default=str).encode()
    frame = HEADER.pack(len(data)) + data
    if fds:
        sent = socket.send_fds(sock, [frame], list(fds))
        if sent < len(frame):
            sock.sendall(frame[sent:])
    else:
        sock.sendall(frame)


def recv(sock: socket.socket, limit: int, deadline: float | None = None, max_fds: int = 0) -> tuple[dict | None, list[int]]:
    """One frame and the descriptors that came with it; ``(None, [])`` when the peer closed before
    sending anything. ``deadline`` (monotonic) bounds the whole frame; ``limit`` its length."""
    fds: list[int] = []
    buf = bytearray()
    need = HEADER.size
    length = None
    try:
        while True:
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise ProtocolError("the request did not arrive in time (half a request?)")
                sock.settimeout(left)
            if max_fds and not fds and not buf:
                chunk, got, flags, _ = socket.recv_fds(sock, 65536, max_fds)
                fds.extend(got)
                if flags & socket.MSG_CTRUNC:
                    raise ProtocolError(f"more than {max_fds} file descriptors sent")
            else:
                chunk = sock.recv(min(65536, need - len(buf)))
            if not chunk:
                if not buf and length is None:
                    return None, fds
                raise ProtocolError("the connection closed in the middle of a frame")
            buf += chunk
            if length is None and len(buf) >= HEADER.size:
                (length,) = HEADER.unpack(bytes(buf[:HEADER.size]))
                if length > limit:
                    raise ProtocolError(f"a frame of {length} bytes; at most {limit}")
                del buf[:HEADER.size]
                need = length
            if length is not None and len(buf) >= need:
                break
        try:
            obj = json.loads(bytes(buf[:need]).decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError) as exc:
            raise ProtocolError(f"not JSON: {str(exc)[:120]}") from None
        if not isinstance(obj, dict):
            raise ProtocolError(f"a frame must hold a JSON object, not {type(obj).__name__}")
        return obj, fds
    except socket.timeout:
        _close(fds)
        raise ProtocolError("the request did not arrive in time (half a request?)") from None
    except BaseException:
        _close(fds)
        raise
    finally:
        sock.settimeout(None)


def _close(fds: list[int]) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


__all__ = ["HEADER", "MAX_REQUEST", "MAX_REPLY", "MAX_FDS", "ProtocolError", "send", "recv"]
