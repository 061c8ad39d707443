"""A TCP proxy that delays every chunk by a fixed time in each direction: a network between the
service and Redis or RabbitMQ on a machine whose kernel has no netem.

    python -m bench.delayproxy --listen 127.0.0.1:7000 --target 127.0.0.1:6379 --delay-ms 0.25

Each direction of each connection has a reader that stamps chunks as they arrive and a writer that
sends each one when its time has come, so pipelined traffic is delayed, not serialized. A delay
of 0 still copies every byte through the proxy, which makes it the fair baseline for a delayed run.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import signal
import socket
import threading
import time


def _pump(source: socket.socket, sink: socket.socket, delay: float) -> None:
    chunks: collections.deque[tuple[float, bytes]] = collections.deque()
    ready = threading.Condition()
    closed = threading.Event()

    def read() -> None:
        try:
            while data := source.recv(65536):
                with ready:
                    chunks.append((time.perf_counter() + delay, data))
                    ready.notify()
        except OSError:
            pass
        closed.set()
        with ready:
            ready.notify()

    def write() -> None:
        try:
            while True:
                with ready:
                    while not chunks and not closed.is_set():
                        ready.wait()
                    if not chunks:
                        break
                    due, data = chunks.popleft()
                wait = due - time.perf_counter()
                if wait > 0:
                    time.sleep(wait)
                sink.sendall(data)
        except OSError:
            pass
        for sock in (sink, source):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    threading.Thread(target=read, daemon=True).start()
    threading.Thread(target=write, daemon=True).start()


def serve(listen: tuple[str, int], target: tuple[str, int], delay: float) -> None:
    server = socket.create_server(listen, reuse_port=False)
    while True:
        client, _ = server.accept()
        try:
            upstream = socket.create_connection(target, timeout=5)
        except OSError:
            client.close()
            continue
        upstream.settimeout(None)
        for sock in (client, upstream):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        _pump(client, upstream, delay)
        _pump(upstream, client, delay)


def _address(text: str) -> tuple[str, int]:
    host, port = text.rsplit(":", 1)
    if host not in {"127.0.0.1", "localhost"}:
        raise argparse.ArgumentTypeError("the proxy only listens and connects on this machine")
    return host, int(port)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--listen", type=_address, required=True)
    parser.add_argument("--target", type=_address, required=True)
    parser.add_argument("--delay-ms", type=float, default=0.25, help="added in each direction")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(SystemExit(0)))
    serve(args.listen, args.target, args.delay_ms / 1000)


if __name__ == "__main__":
    main()
