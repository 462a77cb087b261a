"""Egress tunnel benchmarks against a direct loopback baseline measured in the same run.

    python bench/bench_egress.py [--mb 100] [--requests 200]

  1. throughput: a download from a loopback HTTP server, through the sandbox's proxy and
     tunnel  vs  the same client straight to the server from the host  (goal: >= half)
  2. added latency per request: small GETs through the proxy vs direct (goal: < 2 ms median)

The server runs on 127.0.0.1 on this machine; the sandbox reaches it because the policy
allows the address explicitly.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import tempfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from stockade import Sandbox

CHUNK = b"x" * (1024 * 1024)

CLIENT = r"""
import json, socket, sys, time
host, port, mb, n, proxy = sys.argv[1], int(sys.argv[2]), *map(int, sys.argv[3:5]), sys.argv[5]
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
t = time.perf_counter(); size = get(f"/big/{mb}"); big = time.perf_counter() - t
lat = []
for _ in range(n):
    t = time.perf_counter(); get("/small"); lat.append(time.perf_counter() - t)
lat.sort()
print(json.dumps({"bytes": size, "seconds": big, "latency_median": lat[len(lat) // 2]}))
"""


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        if self.path.startswith("/big/"):
            mb = int(self.path.rsplit("/", 1)[1])
            self.send_response(200)
            self.send_header("Content-Length", str(mb * len(CHUNK)))
            self.send_header("Connection", "close")
            self.end_headers()
            for _ in range(mb):
                self.wfile.write(CHUNK)
        else:
            self.send_response(200)
            self.send_header("Content-Length", "2")
            self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(b"ok")
        self.close_connection = True

    def log_message(self, *args: object) -> None:
        pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=100)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="stockade-bench-egress-"))
    os.environ.setdefault("STOCKADE_STATE_DIR", str(work / "state"))
    project = work / "project"
    project.mkdir()
    (project / "stockade.toml").write_text('[network]\nallow = ["127.0.0.1"]\n')
    (project / "client.py").write_text(CLIENT)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    port = server.server_address[1]
    threading.Thread(target=server.serve_forever, daemon=True).start()
    argv = ["127.0.0.1", str(port), str(args.mb), str(args.requests)]
    try:
        direct = json.loads(
            subprocess.run(
                ["/usr/bin/python3", str(project / "client.py"), *argv, ""],
                check=True, capture_output=True, text=True,
            ).stdout
        )  # fmt: skip
        with Sandbox.create(project_dir=project, backend="namespace") as sb:
            result = sb.commands.run(["python3", "client.py", *argv, "3128"], timeout=600)
            if result.exit_code != 0:
                raise SystemExit(f"client in the sandbox failed: {result.stderr}")
            tunnel = json.loads(result.stdout)
    finally:
        server.shutdown()

    def rate(r: dict[str, float]) -> float:
        return r["bytes"] / r["seconds"] / 1e6

    from rich.console import Console
    from rich.table import Table

    title = f"stockade egress bench ({args.mb} MB, {args.requests} requests)"
    table = Table("measurement", "through tunnel", "direct loopback", "ratio", "goal", title=title)
    table.add_row(
        "download throughput",
        f"{rate(tunnel):.0f} MB/s",
        f"{rate(direct):.0f} MB/s",
        f"{rate(tunnel) / rate(direct):.2f}x",
        ">= 0.5x",
    )
    added = (tunnel["latency_median"] - direct["latency_median"]) * 1000
    table.add_row(
        "request latency (median)",
        f"{tunnel['latency_median'] * 1000:.2f} ms",
        f"{direct['latency_median'] * 1000:.2f} ms",
        f"+{added:.2f} ms",
        "< +2 ms",
    )
    Console().print(table)
    assert tunnel["bytes"] >= args.mb * len(CHUNK)
    if args.json:
        args.json.write_text(json.dumps({"tunnel": tunnel, "direct": direct}, indent=2))
    _ = statistics  # medians are computed by the client script


if __name__ == "__main__":
    main()
