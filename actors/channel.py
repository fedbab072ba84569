"""A same-node request channel to an index actor: two named pipes instead of a Ray call.

Ray actor calls cost milliseconds here (scheduling, serialization, event loops); a decode step
makes one selection request per sparse layer, so that cost adds up. A worker on the same node as
its index actor (a placement group guarantees it) can instead write a pickled request into a FIFO
that a thread of the actor reads, and read the pickled answer back from a second FIFO. Only ids,
queries and small metadata travel (page bytes stay in the shared pools). Asynchronous writes
(build, insert) and anything across nodes still go through Ray.

If the actor dies the pipe reads EOF and the call raises :class:`ChannelBroken`, which the
worker's recovery treats like an actor failure (``engine.stores.ServiceClient.recover``).
"""

from __future__ import annotations

import logging
import os
import pickle
import struct
import tempfile
import threading

log = logging.getLogger(__name__)

_LEN = struct.Struct("<Q")
CHANNEL_METHODS = frozenset({"select", "token_rows", "release"})  # synchronous calls worth the fast path


class ChannelBroken(ConnectionError):
    """The other end of a channel went away (the actor died or closed it)."""


def channel_paths(name: str) -> tuple[str, str]:
    """(request FIFO, answer FIFO) of channel ``name`` on this node."""
    base = os.path.join(tempfile.gettempdir(), "icecache_ray_channels")
    os.makedirs(base, exist_ok=True)
    return os.path.join(base, f"{name}.req"), os.path.join(base, f"{name}.ans")


def remove_channels(prefix: str) -> int:
    """Remove this node's FIFOs whose channel name starts with ``prefix`` (left by killed actors)."""
    base = os.path.dirname(channel_paths("x")[0])
    gone = 0
    for entry in os.listdir(base):
        if entry.startswith(prefix):
            os.unlink(os.path.join(base, entry))
            gone += 1
    return gone


def _read_message(fh) -> object:
    head = fh.read(_LEN.size)
    if len(head) < _LEN.size:
        raise ChannelBroken("channel closed by the other end")
    size = _LEN.unpack(head)[0]
    body = fh.read(size)
    if len(body) < size:
        raise ChannelBroken("channel closed mid-message")
    return pickle.loads(body)


def _write_message(fh, obj: object) -> None:
    body = pickle.dumps(obj, protocol=5)
    fh.write(_LEN.pack(len(body)) + body)
    fh.flush()


def serve(service, name: str) -> tuple[str, str]:
    """Create channel ``name``'s FIFOs and a daemon thread that answers requests with ``service``'s
    methods (which lock themselves). Returns the FIFO paths for the client."""
    req, ans = channel_paths(name)
    for path in (req, ans):
        if os.path.exists(path):
            os.unlink(path)  # left by a previous incarnation
        os.mkfifo(path, 0o600)
    threading.Thread(target=_serve_loop, args=(service, req, ans), name=f"channel-{name}", daemon=True).start()
    return req, ans


def _serve_loop(service, req: str, ans: str) -> None:
    try:
        with open(req, "rb") as rfh, open(ans, "wb") as wfh:
            while True:
                try:
                    method, args = _read_message(rfh)
                except ChannelBroken:
                    return
                if method not in CHANNEL_METHODS:
                    _write_message(wfh, (False, ValueError(f"method {method!r} is not served on the channel")))
                    continue
                try:
                    _write_message(wfh, (True, getattr(service, method)(*args)))
                except Exception as exc:  # noqa: BLE001 - the caller re-raises it
                    _write_message(wfh, (False, exc))
    except OSError as exc:
        log.warning("channel %s stopped: %s", req, exc)
    finally:
        for path in (req, ans):
            if os.path.exists(path):
                os.unlink(path)


class ChannelClient:
    """The worker's end: one request at a time (the caller's layers run in order)."""

    def __init__(self, req: str, ans: str) -> None:
        self._w = open(req, "wb")
        self._r = open(ans, "rb")

    def call(self, method: str, *args):
        try:
            _write_message(self._w, (method, args))
        except (BrokenPipeError, ValueError) as exc:
            raise ChannelBroken(f"channel write failed: {exc}") from exc
        ok, value = _read_message(self._r)
        if not ok:
            raise value
        return value

    def close(self) -> None:
        for fh in (self._w, self._r):
            try:
                fh.close()
            except OSError:
                pass


class ChannelHandle:
    """A :class:`~icecache_ray.actors.handles.RayHandle` whose synchronous calls take the channel
    when the actor is on this node (the FIFOs exist here), Ray otherwise."""

    remote = True

    def __init__(self, ray_handle, name: str) -> None:
        self.ray_handle, self.name = ray_handle, name
        self.failures = ray_handle.failures + (ChannelBroken,)
        self.client: ChannelClient | None = None
        self.reconnect()

    def reconnect(self) -> None:
        """(Re)open the channel to the actor's current incarnation."""
        if self.client is not None:
            self.client.close()
            self.client = None
        ray = self.ray_handle.ray
        req, ans = ray.get(self.ray_handle.actor.open_channel.remote(self.name))
        if os.path.exists(req):
            self.client = ChannelClient(req, ans)
        else:
            log.info("index actor on another node: channel %s unused, calls go through Ray", self.name)

    def submit(self, method: str, *args):
        if self.client is not None and method in CHANNEL_METHODS:
            return _Answer(self.client.call(method, *args))
        return self.ray_handle.submit(method, *args)

    def close(self) -> None:
        if self.client is not None:
            self.client.close()
            self.client = None


class _Answer:
    def __init__(self, value) -> None:
        self.value = value

    def result(self):
        return self.value
