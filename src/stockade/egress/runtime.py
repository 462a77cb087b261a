"""One sandbox's way out: the agent's listeners, the tunnel, and the host egress proxy.

Every sandbox of a backend that enforces a network policy gets this, even with the default
deny-all policy, so a denied request is answered with a 403 that says which rule to add
instead of an opaque connection error. The sandbox sees ``HTTP_PROXY`` & co. pointing at the
agent's listener on 127.0.0.1; each accepted connection is tunnelled over the agent channel
to ``EgressProxy`` here, which decides, resolves, connects and relays.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import ssl
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import anyio
from anyio.abc import ByteStream

from stockade._streams import PrefixedStream
from stockade.policy.decide import NetworkRules, compile_rules, decide, with_allowed, with_denied
from stockade.policy.rules import is_ip_literal

if TYPE_CHECKING:
    from stockade._background import BackgroundTasks
    from stockade.agent.client import AgentClient
    from stockade.agent.tunnel import TunnelMux, TunnelStream
    from stockade.egress.fastpath import GuestSocketStream
    from stockade.egress.log import ConnectionRecord, RelayCounters
    from stockade.egress.proxy import EgressProxy
    from stockade.egress.secrets import SecretSet
    from stockade.egress.tls import SandboxCA
    from stockade.policy import EffectivePolicy

__all__ = ["PROXY_PORT", "EgressLaunch", "EgressRuntime", "host_networks", "proxy_env"]

logger = logging.getLogger(__name__)

#: The agent's HTTP/SOCKS5 proxy port inside the sandbox (its own network namespace).
PROXY_PORT = 3128
#: Where the trust bundle (system CAs + the sandbox's CA) and the CA alone appear inside.
SANDBOX_BUNDLE = "/etc/stockade/ca-bundle.pem"
SANDBOX_CA = "/etc/stockade/ca.pem"
SYSTEM_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"
#: Bytes per read of each relayed direction (the host holds at most this much per direction).
RELAY_BUFFER = 256 * 1024


def host_networks() -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    """The host's directly connected networks (its LAN), from the kernel's routing tables.

    A name that resolves into one of them is refused like a private address, whatever the
    range: the sandbox must not reach the host's neighbours (or its gateway) by name.
    """
    found: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []
    try:
        with open("/proc/net/route") as routes:
            next(routes, None)
            for line in routes:
                fields = line.split()
                if len(fields) < 8 or fields[2] != "00000000" or fields[1] == "00000000":
                    continue
                dest = ipaddress.IPv4Address(int(fields[1], 16).to_bytes(4, "little"))
                mask = ipaddress.IPv4Address(int(fields[7], 16).to_bytes(4, "little"))
                found.append(ipaddress.IPv4Network(f"{dest}/{mask}", strict=False))
    except OSError:
        logger.debug("no IPv4 routing table to read")
    try:
        with open("/proc/net/ipv6_route") as routes:
            for line in routes:
                fields = line.split()
                if len(fields) < 10 or set(fields[4]) != {"0"} or int(fields[1], 16) == 0:
                    continue
                dest6 = ipaddress.IPv6Address(bytes.fromhex(fields[0]))
                found.append(ipaddress.IPv6Network(f"{dest6}/{int(fields[1], 16)}", strict=False))
    except OSError:
        logger.debug("no IPv6 routing table to read")
    return tuple(dict.fromkeys(found))


def proxy_env(port: int = PROXY_PORT) -> dict[str, str]:
    """Proxy variables for the sandbox, upper- and lower-case (tools read either)."""
    url = f"http://127.0.0.1:{port}"
    values = {
        "HTTP_PROXY": url,
        "HTTPS_PROXY": url,
        "ALL_PROXY": f"socks5h://127.0.0.1:{port}",
        "NO_PROXY": "localhost,127.0.0.1,::1",
    }
    return {**values, **{k.lower(): v for k, v in values.items()}}


@dataclass(frozen=True)
class EgressLaunch:
    """What a backend must set up inside the sandbox for egress."""

    proxy_port: int
    #: (local port inside the sandbox, "host:port" target) per raw TCP rule
    forwards: tuple[tuple[int, str], ...] = ()
    env: dict[str, str] = field(default_factory=dict)
    #: names that must resolve to 127.0.0.1 inside (so a forward's host name just works)
    local_names: tuple[str, ...] = ()
    #: (host file, path inside) to mount read-only, e.g. the trust bundle with our CA
    files: tuple[tuple[str, str], ...] = ()

    def agent_args(self) -> list[str]:
        args = ["--net-proxy", str(self.proxy_port)]
        for local, target in self.forwards:
            args += ["--net-forward", f"{local}={target}"]
        return args


def _forwards(tcp: tuple[str, ...]) -> tuple[tuple[tuple[int, str], ...], tuple[str, ...]]:
    """Local ports for the raw TCP rules: the same port when unprivileged, else 10000+port."""
    forwards: list[tuple[int, str]] = []
    names: list[str] = []
    used = {PROXY_PORT}
    for entry in tcp:
        host, _, port_text = entry.rpartition(":")
        port = int(port_text)
        local = port if port >= 1024 else 10000 + port
        while local in used:
            local += 1
        used.add(local)
        forwards.append((local, entry))
        bare = host.strip("[]")
        if not is_ip_literal(bare) and local == port and not bare.startswith("*"):
            names.append(bare)
    return tuple(forwards), tuple(names)


class EgressRuntime:
    """The egress proxy of one sandbox and its connection to the agent's tunnel."""

    def __init__(
        self,
        policy: EffectivePolicy,
        *,
        sandbox: str,
        state_dir: Path,
        sandbox_id: str = "",
        environ: Mapping[str, str] | None = None,
        on_event: Callable[[ConnectionRecord], None] | None = None,
    ) -> None:
        from stockade.egress.proxy import EgressProxy

        network = policy.network
        source = os.environ if environ is None else environ
        #: Let the agent hand accepted sockets over where the channel allows it (the
        #: namespace backend). STOCKADE_INTERNAL_EGRESS_FD=0 keeps every connection on framed
        #: streams (to measure or test that path there).
        self.fd_passing = source.get("STOCKADE_INTERNAL_EGRESS_FD", "1") != "0"
        #: The agent connection's tunnel, once attached (its counters show the path taken).
        self.tunnel: TunnelMux | None = None
        self.rules: NetworkRules = compile_rules(
            network.allow, network.deny, network.tcp, local_networks=host_networks()
        )
        forwards, names = _forwards(network.tcp)
        env = proxy_env()
        if forwards:
            env["STOCKADE_TCP_FORWARDS"] = ",".join(f"{t}=127.0.0.1:{p}" for p, t in forwards)
        files: list[tuple[str, str]] = []
        self.secrets: SecretSet | None = None
        self.ca: SandboxCA | None = None
        self._upstream_ssl: ssl.SSLContext | None = None
        if policy.secrets:
            env_files = self._prepare_secrets(
                policy, state_dir, sandbox, sandbox_id, os.environ if environ is None else environ
            )
            env.update(env_files[0])
            files += env_files[1]
        self.launch = EgressLaunch(PROXY_PORT, forwards, env, names, tuple(files))
        self.proxy: EgressProxy = EgressProxy(
            rules=self.rules,
            # One tunnel frame per read: fewer trips through the event loop per byte.
            buffer_size=RELAY_BUFFER,
            decide=decide,
            on_event=on_event,
            sandbox=sandbox,
            tunnel=self._tunnel if self.secrets is not None else None,
        )

    def _prepare_secrets(
        self,
        policy: EffectivePolicy,
        state_dir: Path,
        sandbox: str,
        sandbox_id: str,
        environ: Mapping[str, str],
    ) -> tuple[dict[str, str], list[tuple[str, str]]]:
        """Read the secrets on the host, make the sandbox's CA, and what the sandbox gets."""
        from stockade.egress.intercept import upstream_context
        from stockade.egress.secrets import SecretSet
        from stockade.egress.tls import SandboxCA, trust_env

        secrets = SecretSet.load(
            policy.secrets, environ, Path(environ.get("HOME") or Path.home()),
            sandbox_id=sandbox_id,
        )  # fmt: skip
        ca_dir = state_dir / "ca"
        if (ca_dir / "ca.pem").exists():
            ca = SandboxCA.load(ca_dir)
        else:
            ca = SandboxCA.create(
                ca_dir, name=sandbox, permitted_hosts=secrets.hosts_needing_interception()
            )
        bundle = state_dir / "ca-bundle.pem"
        bundle.write_bytes(ca.trust_bundle())
        bundle.chmod(0o644)
        self.secrets, self.ca = secrets, ca
        self._upstream_ssl = upstream_context()
        env = {**trust_env(SANDBOX_BUNDLE, SANDBOX_CA), **secrets.sandbox_env()}
        files = [(str(bundle), SANDBOX_BUNDLE), (str(ca.cert_path), SANDBOX_CA)]
        if Path(SYSTEM_BUNDLE).exists():
            files.append((str(bundle), SYSTEM_BUNDLE))  # for tools that ignore the variables
        return env, files

    async def _tunnel(
        self,
        client: ByteStream,
        upstream: ByteStream,
        *,
        kind: str,
        host: str,
        port: int,
        counters: RelayCounters,
    ) -> None:
        """Intercept TLS only towards hosts a secret may be sent to; tunnel the rest.

        Whether the client speaks TLS is read from its first bytes (a TLS handshake record),
        not guessed from the port, so SSH to a host that also has an API secret still works.
        """
        from stockade.egress.dial import relay
        from stockade.egress.intercept import intercept_https

        secrets, ca = self.secrets, self.ca
        if (
            secrets is not None
            and ca is not None
            and kind in ("connect", "socks5")
            and secrets.needs_interception(host)
        ):
            try:
                first = await client.receive(self.proxy.buffer_size)
            except (anyio.EndOfStream, anyio.BrokenResourceError):
                await client.aclose()
                await upstream.aclose()
                return
            replayed = PrefixedStream(client, first)
            if first[:1] == b"\x16":  # TLS handshake record: a ClientHello
                await intercept_https(
                    replayed,
                    host,
                    port,
                    upstream,
                    ca=ca,
                    secrets=secrets,
                    upstream_ssl=self._upstream_ssl,
                    counters=counters,
                )
                return
            client = replayed
        await relay(
            client,
            upstream,
            buffer_size=self.proxy.buffer_size,
            counters=counters,
            limiter=self.proxy.relay_threads,
        )

    def attach(self, client: AgentClient, background: BackgroundTasks) -> None:
        """Route the agent's accepted connections to the proxy, each in its own task."""
        from stockade.agent.tunnel import TunnelMux
        from stockade.protocol.messages import NetDirectParams

        def on_accept(stream: TunnelStream | GuestSocketStream) -> None:
            accept = stream.accept
            if accept.kind == "forward" and accept.target:
                background.start(self._handle_forward, stream, accept.target, accept.peer)
            else:
                background.start(self._handle_proxy, stream, accept.peer)

        def on_direct(report: NetDirectParams) -> None:
            self.proxy.record_direct(report.target, peer=report.peer)

        mux = TunnelMux(client.notify, on_accept, on_direct)
        mux.offer_fd = self.fd_passing
        client.tunnel = self.tunnel = mux

    async def _handle_proxy(self, stream: ByteStream, peer: str) -> None:
        await self.proxy.handle_proxy_stream(stream, peer=peer)

    async def _handle_forward(self, stream: ByteStream, target: str, peer: str) -> None:
        await self.proxy.handle_forward_stream(stream, target, peer=peer)

    def allow(self, entry: str) -> None:
        """Allow ``entry`` from the next connection on (``stockade net allow``)."""
        self.rules = with_allowed(self.rules, entry)
        self.proxy.set_rules(self.rules)

    def deny(self, entry: str) -> None:
        """Deny ``entry`` from the next connection on (``stockade net deny``)."""
        self.rules = with_denied(self.rules, entry)
        self.proxy.set_rules(self.rules)

    def log(self) -> list[ConnectionRecord]:
        return self.proxy.log()
