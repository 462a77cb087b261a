"""Egress tunnel benchmarks against a direct loopback baseline measured in the same run.

    python bench/bench_egress.py [--mb 100] [--requests 200] [--repeat 5] [--path both]

Both tunnel paths of the namespace backend are measured (``--path`` picks one): 'fd', where
the agent hands each accepted connection's socket to the host and the proxy relays it in the
kernel (protocol 1.3, every backend on the host kernel with a socket channel), and 'framed',
the general path (stream frames over the agent channel, two Python relays) that microVM,
gVisor and Docker use. The bench checks that each run really took its path.

  1. throughput: downloads from a loopback HTTP server, through the sandbox's proxy and
     tunnel  vs  the same client straight to the server from the host  (goal: >= half)
  2. added latency per request: small GETs through the proxy vs direct (goal: < 2 ms median)

A reference row is the floor of doing it in Python at all: the same client through one plain
relay (two Python threads in this process, blocking recv/sendall of 1 MiB, no policy, no
framing). The framed tunnel runs two such loops (host proxy and guest agent) with a channel
between them, so it cannot reach that row; the fd path runs none. The goal is against
direct loopback. The HTTP server
is a separate process, like a real upstream.

Every number is a median: of ``--repeat`` downloads, and of ``--requests`` requests, times
``--rounds`` interleaved rounds. The
server runs on 127.0.0.1 on this machine; the sandbox reaches it because the policy allows
the address explicitly.
"""

from __future__ import annotations

import argparse
import contextlib
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


def tunnel_client(sb: Sandbox, argv: list[str]) -> dict[str, list[float]]:
    result = sb.commands.run(["python3", "client.py", *argv, "3128"], timeout=600)
    if result.exit_code != 0:
        raise SystemExit(f"client in the sandbox failed: {result.stderr}")
    out: dict[str, list[float]] = json.loads(result.stdout)
    return out


def create(project: Path, path: str) -> Sandbox:
    """A namespace sandbox whose egress takes ``path``: 'fd' (sockets handed to the host,
    relayed in the kernel) or 'framed' (stream frames over the agent channel)."""
    previous = os.environ.get("STOCKADE_INTERNAL_EGRESS_FD")
    os.environ["STOCKADE_INTERNAL_EGRESS_FD"] = "1" if path == "fd" else "0"
    try:
        return Sandbox.create(project_dir=project, backend="namespace")
    finally:
        if previous is None:
            del os.environ["STOCKADE_INTERNAL_EGRESS_FD"]
        else:
            os.environ["STOCKADE_INTERNAL_EGRESS_FD"] = previous


def fd_connections(sb: Sandbox) -> int:
    """Connections the agent handed over as sockets (0: every one went framed)."""
    runtime = sb._inner._egress  # the bench checks which path really carried the bytes
    assert runtime is not None and runtime.tunnel is not None
    return runtime.tunnel.fd_accepted


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=100)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--repeat", type=int, default=5, help="downloads per path (median)")
    parser.add_argument(
        "--path",
        choices=("both", "fd", "framed"),
        default="both",
        help="tunnel path(s) to measure on the namespace backend (default: both)",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=3,
        help="rounds of every measurement, interleaved; medians are over all of them",
    )
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    paths = ["fd", "framed"] if args.path == "both" else [args.path]
    load_before = os.getloadavg()[0]

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
    tunnels: dict[str, dict[str, list[float]]] = {p: {"rates": [], "latencies": []} for p in paths}
    direct: dict[str, list[float]] = {"rates": [], "latencies": []}
    relayed: dict[str, list[float]] = {"rates": [], "latencies": []}
    handed: dict[str, int] = {}

    def add(into: dict[str, list[float]], got: dict[str, list[float]]) -> None:
        for key, values in got.items():
            into[key] += values

    try:
        with contextlib.ExitStack() as stack:
            boxes = {path: stack.enter_context(create(project, path)) for path in paths}
            # Interleaved rounds, so a noisy neighbour on this shared machine hits all alike.
            for _ in range(args.rounds):
                add(direct, host_client(script, argv, port))
                add(relayed, host_client(script, argv, relay_port))
                for path, sb in boxes.items():
                    add(tunnels[path], tunnel_client(sb, argv))
            for path, sb in boxes.items():
                handed[path] = fd_connections(sb)
    finally:
        server.kill()
        server.wait()
    connections = (args.repeat + args.requests) * args.rounds
    if "fd" in handed and handed["fd"] < connections:
        raise SystemExit(f"the fd path carried only {handed['fd']} of {connections} connections")
    if handed.get("framed"):
        raise SystemExit(f"the framed run handed {handed['framed']} sockets over")

    from rich.console import Console
    from rich.table import Table

    def rate(r: dict[str, list[float]]) -> float:
        return statistics.median(r["rates"]) / 1e6

    def latency(r: dict[str, list[float]]) -> float:
        return statistics.median(r["latencies"]) * 1000

    title = (
        f"stockade egress bench, namespace backend ({args.rounds} rounds of {args.repeat} x "
        f"{args.mb} MB and {args.requests} requests; medians; load "
        f"{load_before:.2f} before, {os.getloadavg()[0]:.2f} after)"
    )
    table = Table("measurement", "path", "through tunnel", "direct loopback", "ratio", "goal",
                  title=title)  # fmt: skip
    labels = {"fd": "fd (socket handed over)", "framed": "framed (stream frames)"}
    for path, tunnel in tunnels.items():
        table.add_row(
            "download throughput",
            labels[path],
            f"{rate(tunnel):.0f} MB/s",
            f"{rate(direct):.0f} MB/s",
            f"{rate(tunnel) / rate(direct):.2f}x",
            ">= 0.5x",
        )
    for path, tunnel in tunnels.items():
        added = latency(tunnel) - latency(direct)
        table.add_row(
            "request latency",
            labels[path],
            f"{latency(tunnel):.2f} ms",
            f"{latency(direct):.2f} ms",
            f"{added:+.2f} ms",
            "< +2 ms",
        )
    table.add_row(
        "download throughput",
        "1 Python relay hop (reference)",
        f"{rate(relayed):.0f} MB/s",
        f"{rate(direct):.0f} MB/s",
        f"{rate(relayed) / rate(direct):.2f}x",
        "",
    )
    table.add_row(
        "request latency",
        "1 Python relay hop (reference)",
        f"{latency(relayed):.2f} ms",
        f"{latency(direct):.2f} ms",
        f"{latency(relayed) - latency(direct):+.2f} ms",
        "",
    )
    Console(width=150).print(table)
    if args.json:
        report = {**{f"tunnel_{p}": t for p, t in tunnels.items()}, "direct": direct,
                  "relay": relayed}  # fmt: skip
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
