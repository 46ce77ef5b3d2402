"""A Kafka-aware TCP proxy between clients and the broker that can lose responses and
hold requests.

It frames both directions (4-byte size prefix), reads each request's api key, version
and correlation id, and asks two hooks what to do:

- `on_request(conn, req)` -> FORWARD | HOLD | CUT: HOLD keeps the request bytes (not sent
  to the broker) until `release(conn)`; CUT drops the client side of the connection
  (the client sees a disconnect) while the broker side stays open until released.
- `on_response(conn, req)` -> FORWARD | DROP_AND_CLOSE: the broker did the work, the
  client never hears about it and loses its connection.

The broker advertises 127.0.0.1 while listening on 127.0.0.2 (see harness.Broker), so
every client connection, bootstrap or not, comes through here."""
import socket
import struct
import threading

FORWARD = "forward"
HOLD = "hold"
CUT = "cut"
DROP_AND_CLOSE = "drop_and_close"

PRODUCE = 0
INIT_PRODUCER_ID = 22
ADD_PARTITIONS_TO_TXN = 24
ADD_OFFSETS_TO_TXN = 25
END_TXN = 26
TXN_OFFSET_COMMIT = 28

MAX_FRAME = 200 * 1024 * 1024


class Request:
    __slots__ = ("api_key", "api_version", "correlation_id", "frame", "released")

    def __init__(self, api_key, api_version, correlation_id, frame):
        self.api_key = api_key
        self.api_version = api_version
        self.correlation_id = correlation_id
        self.frame = frame
        self.released = False  # a held request sent on later: its response goes to on_released_response


def _recv_exact(sock, n):
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            return None
        buf += chunk
    return bytes(buf)


def read_frame(sock):
    head = _recv_exact(sock, 4)
    if head is None:
        return None
    (size,) = struct.unpack(">i", head)
    if size < 0 or size > MAX_FRAME:
        raise ValueError(f"bad frame size {size}")
    body = _recv_exact(sock, size)
    if body is None:
        return None
    return head + body


class Conn:
    """One client connection and its broker connection."""

    def __init__(self, proxy, cid, client, upstream):
        self.proxy = proxy
        self.id = cid
        self.client = client
        self.upstream = upstream
        self.inflight = {}   # correlation id -> Request
        self.held = []       # requests not yet sent to the broker
        self.lock = threading.Lock()
        self.client_open = True
        self.upstream_open = True

    def close_client(self):
        with self.lock:
            if self.client_open:
                self.client_open = False
                try:
                    self.client.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                self.client.close()

    def close_upstream(self):
        with self.lock:
            if self.upstream_open:
                self.upstream_open = False
                try:
                    self.upstream.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                self.upstream.close()

    def close(self):
        self.close_client()
        self.close_upstream()

    def send_upstream(self, frame):
        self.upstream.sendall(frame)

    def release(self):
        """Sends the held requests to the broker now (the client may be long gone)."""
        with self.lock:
            held, self.held = self.held, []
        for req in held:
            req.released = True
            self.inflight[req.correlation_id] = req
            try:
                self.send_upstream(req.frame)
            except OSError:
                return False
        return True


class Proxy:
    def __init__(self, listen, upstream, on_request=None, on_response=None, on_released_response=None):
        self.listen = listen
        self.on_released_response = on_released_response or (lambda conn, req, frame: None)
        self.upstream = upstream
        self.on_request = on_request or (lambda conn, req: FORWARD)
        self.on_response = on_response or (lambda conn, req: FORWARD)
        self.conns = []
        self.lock = threading.Lock()
        self.next_id = 0
        self.stopping = False
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(listen)
        self.sock.listen(128)
        self.stats = {"connections": 0, "requests": 0, "responses": 0, "dropped_responses": 0, "held": 0, "cut": 0}
        self.thread = threading.Thread(target=self._accept, daemon=True, name="proxy-accept")
        self.thread.start()

    def _accept(self):
        while not self.stopping:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            try:
                up = socket.create_connection(self.upstream, timeout=5)
                up.settimeout(None)
            except OSError:
                client.close()  # broker down: the client sees a refused-like close
                continue
            for s in (client, up):
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self.lock:
                self.next_id += 1
                conn = Conn(self, self.next_id, client, up)
                self.conns = [c for c in self.conns if c.client_open or c.upstream_open]
                self.conns.append(conn)
                self.stats["connections"] += 1
            threading.Thread(target=self._c2s, args=(conn,), daemon=True).start()
            threading.Thread(target=self._s2c, args=(conn,), daemon=True).start()

    def _c2s(self, conn):
        try:
            while True:
                frame = read_frame(conn.client)
                if frame is None:
                    break
                api_key, api_version, corr = struct.unpack(">hhi", frame[4:12])
                req = Request(api_key, api_version, corr, frame)
                with self.lock:
                    self.stats["requests"] += 1
                action = self.on_request(conn, req)
                if action == HOLD:
                    with conn.lock:
                        conn.held.append(req)
                    with self.lock:
                        self.stats["held"] += 1
                    continue
                if action == CUT:
                    with conn.lock:
                        conn.held.append(req)
                    with self.lock:
                        self.stats["held"] += 1
                        self.stats["cut"] += 1
                    conn.close_client()
                    return  # the broker side stays open until release() / stop()
                conn.inflight[corr] = req
                conn.send_upstream(frame)
        except (OSError, ValueError):
            pass
        # Client gone: keep the broker side only while something is held for it.
        with conn.lock:
            keep = bool(conn.held)
        conn.close_client()
        if not keep:
            conn.close_upstream()

    def _s2c(self, conn):
        try:
            while True:
                frame = read_frame(conn.upstream)
                if frame is None:
                    break
                (corr,) = struct.unpack(">i", frame[4:8])
                req = conn.inflight.pop(corr, None)
                with self.lock:
                    self.stats["responses"] += 1
                if req is not None and req.released:
                    self.on_released_response(conn, req, frame)
                    continue
                if req is not None and self.on_response(conn, req) == DROP_AND_CLOSE:
                    with self.lock:
                        self.stats["dropped_responses"] += 1
                    conn.close()
                    return
                if conn.client_open:
                    try:
                        conn.client.sendall(frame)
                    except OSError:
                        pass
        except (OSError, ValueError):
            pass
        conn.close()

    def release_all(self):
        with self.lock:
            conns = list(self.conns)
        n = 0
        for c in conns:
            if c.held:
                n += 1
                c.release()
        return n

    def close_all(self):
        with self.lock:
            conns, self.conns = self.conns, []
        for c in conns:
            c.close()

    def stop(self):
        self.stopping = True
        try:
            self.sock.close()
        except OSError:
            pass
        self.close_all()
