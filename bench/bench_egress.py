"""Egress tunnel benchmarks against a direct loopback baseline measured in the same run.

    python bench/bench_egress.py [--mb 100] [--requests 200] [--repeat 5]

  1. throughput: downloads from a loopback HTTP server, through the sandbox's proxy and
     tunnel  vs  the same client straight to the server from the host  (goal: >= half)
  2. added latency per request: small GETs through the proxy vs direct (goal: < 2 ms median)

A third column is the floor of doing it in Python at all: the same client through one plain
relay (two Python threads in this process, blocking recv/sendall of 1 MiB, no policy, no
framing). The tunnel runs two such loops (host proxy and guest agent) with a pipe between
them, so it cannot reach this column; the goal is against direct loopback. The HTTP server
is a separate process, like a real upstream.

Every number is a median: of ``--repeat`` downloads, and of ``--requests`` requests. The
server runs on 127.0.0.1 on this machine; the sandbox reaches it because the policy allows
the address explicitly.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import tempfile
import threading
from pathlib import Path

from stockade import Sandbox

CLIENT = r"""
import json, socket, sys, time
host, port, proxy = sys.argv[1], int(sys.argv[2]), sys.argv[6]
mb, n, repeat = map(int, sys.argv[3:6])
def get(path):
    if proxy:
        s = socket.create_connection(("127.0.0.1", int(proxy)))
        target = f"http://{host}:{port}{path}"
        s.sendall(f"GET {target} HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n".encode())
    else:
        s = socket.create_connection((host, port))
        head = f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nConnection: close\r\n\r\n"
        s.sendall(head.encode())
    total = 0
    while True:
        data = s.recv(1 << 20)
        if not data:
            break
        total += len(data)
    s.close()
    return total
rates = []
for _ in range(repeat):
    t = time.perf_counter(); size = get(f"/big/{mb}")
    rates.append(size / (time.perf_counter() - t))
    assert size >= mb << 20, size
lat = []
for _ in range(n):
    t = time.perf_counter(); get("/small"); lat.append(time.perf_counter() - t)
print(json.dumps({"rates": rates, "latencies": lat}))
"""


SERVER = r"""
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
CHUNK = b"x" * (1024 * 1024)
class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_GET(self):
        big = self.path.startswith("/big/")
        mb = int(self.path.rsplit("/", 1)[1]) if big else 0
        self.send_response(200)
        self.send_header("Content-Length", str(mb * len(CHUNK) if big else 2))
        self.send_header("Connection", "close")
        self.end_headers()
        if big:
            for _ in range(mb):
                self.wfile.write(CHUNK)
        else:
            self.wfile.write(b"ok")
        self.close_connection = True
    def log_message(self, *args):
        pass
server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
print(server.server_address[1], flush=True)
server.serve_forever()
"""


def start_relay(target: tuple[str, int]) -> int:
    """One-hop Python relay (the floor of any Python data path): returns its port."""
    listener = socket.create_server(("127.0.0.1", 0))

    def pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(1 << 20):
                dst.sendall(data)
            dst.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def serve() -> None:
        while True:
            client, _ = listener.accept()
            upstream = socket.create_connection(target)
            for sock in (client, upstream):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            threading.Thread(target=pump, args=(client, upstream), daemon=True).start()
            threading.Thread(target=pump, args=(upstream, client), daemon=True).start()

    threading.Thread(target=serve, daemon=True).start()
    port: int = listener.getsockname()[1]
    return port


def host_client(script: Path, argv: list[str], port: int) -> dict[str, list[float]]:
    args = ["/usr/bin/python3", str(script), argv[0], str(port), *argv[2:], ""]
    out = subprocess.run(args, check=True, capture_output=True, text=True).stdout
    result: dict[str, list[float]] = json.loads(out)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=100)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--repeat", type=int, default=5, help="downloads per path (median)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="stockade-bench-egress-"))
    os.environ.setdefault("STOCKADE_STATE_DIR", str(work / "state"))
    project = work / "project"
    project.mkdir()
    (project / "stockade.toml").write_text('[network]\nallow = ["127.0.0.1"]\n')
    script = project / "client.py"
    script.write_text(CLIENT)

    # The server is a process of its own, as a real upstream is: in this process it would
    # compete with the proxy's event loop for the GIL.
    server = subprocess.Popen(["/usr/bin/python3", "-c", SERVER], stdout=subprocess.PIPE, text=True)
    assert server.stdout is not None
    port = int(server.stdout.readline())
    relay_port = start_relay(("127.0.0.1", port))
    argv = ["127.0.0.1", str(port), str(args.mb), str(args.requests), str(args.repeat)]
    try:
        with Sandbox.create(project_dir=project, backend="namespace") as sb:
            # Interleaved, so a noisy neighbour on this shared machine hits all three alike.
            direct = host_client(script, argv, port)
            relayed = host_client(script, argv, relay_port)
            result = sb.commands.run(["python3", "client.py", *argv, "3128"], timeout=600)
            if result.exit_code != 0:
                raise SystemExit(f"client in the sandbox failed: {result.stderr}")
            tunnel: dict[str, list[float]] = json.loads(result.stdout)
    finally:
        server.kill()
        server.wait()

    from rich.console import Console
    from rich.table import Table

    def rate(r: dict[str, list[float]]) -> float:
        return statistics.median(r["rates"]) / 1e6

    def latency(r: dict[str, list[float]]) -> float:
        return statistics.median(r["latencies"]) * 1000

    title = (
        f"stockade egress bench ({args.repeat} x {args.mb} MB, {args.requests} requests; medians)"
    )
    table = Table(
        "measurement",
        "through tunnel",
        "direct loopback",
        "ratio",
        "goal",
        "1 Python relay hop",
        title=title,
    )
    table.add_row(
        "download throughput",
        f"{rate(tunnel):.0f} MB/s",
        f"{rate(direct):.0f} MB/s",
        f"{rate(tunnel) / rate(direct):.2f}x",
        ">= 0.5x",
        f"{rate(relayed):.0f} MB/s ({rate(relayed) / rate(direct):.2f}x)",
    )
    added = latency(tunnel) - latency(direct)
    table.add_row(
        "request latency",
        f"{latency(tunnel):.2f} ms",
        f"{latency(direct):.2f} ms",
        f"+{added:.2f} ms",
        "< +2 ms",
        f"{latency(relayed):.2f} ms (+{latency(relayed) - latency(direct):.2f} ms)",
    )
    Console().print(table)
    if args.json:
        report = {"tunnel": tunnel, "direct": direct, "relay": relayed}
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
