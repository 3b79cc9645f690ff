"""A loopback TCP proxy the tests own, to make a real server unreachable in two ways.

``cut()`` is a loud outage: the port refuses connections and open ones are reset.
``blackhole()`` is a silent one (a host crash, a firewall dropping packets, a dead upstream
behind a live middlebox): the port still accepts connections, but no byte flows either way
on new or open connections, so a client's writes land in buffers and its reads never return.
``restore()`` ends either; bytes held back by a black hole then flow on.
"""

from __future__ import annotations

import socket
import struct
import threading

# What an agent call may take during an outage: a wait on the store lasts at least its
# timeout (a second or more in these tests); a call held up to a few hundred ms is the
# scheduler of a busy 2-core machine with other tests running alongside.
NOT_BLOCKED = 0.5


class TcpProxy:
    def __init__(self, upstream_host: str, upstream_port: int) -> None:
        self.upstream = (upstream_host, upstream_port)
        probe = socket.socket()
        probe.bind(("127.0.0.1", 0))
        self.port = probe.getsockname()[1]
        probe.close()
        self._listener: socket.socket | None = None
        self._conns: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._flowing = threading.Event()
        self._flowing.set()

    def __enter__(self) -> TcpProxy:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self) -> None:
        """Listen on ``self.port`` (again, after ``cut``)."""
        with self._lock:
            if self._listener is not None:
                return
            listener = socket.socket()
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.bind(("127.0.0.1", self.port))
            listener.listen(64)
            self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def restore(self) -> None:
        """End an outage: accept connections again and let held bytes flow."""
        self.start()
        self._flowing.set()

    def cut(self) -> None:
        """Refuse new connections at once and reset every open one."""
        with self._lock:
            listener, self._listener = self._listener, None
        if listener is not None:
            _shutdown(listener)  # wakes the accept loop; close alone would not
            listener.close()
        self._reset_all()

    def blackhole(self) -> None:
        """Accept connections but pass no bytes either way, on new or open ones."""
        self._flowing.clear()
        self.start()

    def close(self) -> None:
        """Stop for good: the end of a test."""
        self.cut()
        self._flowing.set()  # let held pumps notice their sockets are gone

    def _reset_all(self) -> None:
        with self._lock:
            conns, self._conns = self._conns, set()
        for c in conns:
            try:
                c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            except OSError:
                pass
            _shutdown(c)  # wakes a pump blocked in recv
            c.close()  # with linger 0: a reset, not an orderly close

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            threading.Thread(target=self._connect, args=(client,), daemon=True).start()

    def _connect(self, client: socket.socket) -> None:
        with self._lock:
            self._conns.add(client)
        self._flowing.wait()  # a black hole answers nothing, not even with a server
        try:
            server = socket.create_connection(self.upstream)
        except OSError:
            self._drop(client)
            return
        with self._lock:
            if client not in self._conns:  # cut meanwhile
                server.close()
                return
            self._conns.add(server)
        for a, b in ((client, server), (server, client)):
            threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                self._flowing.wait()  # held here while the proxy is a black hole
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                self._drop(s)

    def _drop(self, s: socket.socket) -> None:
        with self._lock:
            self._conns.discard(s)
        try:
            s.close()
        except OSError:
            pass


def _shutdown(s: socket.socket) -> None:
    try:
        s.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


def through(proxy: TcpProxy, url: str, **query: str) -> str:
    """The SQLAlchemy ``url`` reaching its server through ``proxy``, with ``query`` set; an
    ``options`` value goes after the URL's own (libpq takes one ``options``)."""
    from sqlalchemy.engine import make_url

    parsed = make_url(url).set(host="127.0.0.1", port=proxy.port)
    if "options" in query and parsed.query.get("options"):
        query["options"] = f"{parsed.query['options']} {query['options']}"
    return parsed.update_query_dict(query).render_as_string(hide_password=False)
