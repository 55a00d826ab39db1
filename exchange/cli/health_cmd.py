"""`exchange health --config node.toml`: is this machine's node serving?

The check a container HEALTHCHECK, a Kubernetes exec probe, a systemd watchdog script
or an operator runs on the node's own machine. It reads the node's config, dials the
node's own listen address (loopback when it listens on every address) over mutual TLS
with the node's own certificate, which its agency CA issued and which the node
therefore accepts like any member node's, trusting exactly the member CAs of genesis,
and calls the standard grpc.health.v1 Check. Exit 0 and one line when it answers
SERVING; otherwise exit 1 and one line saying why.

With --caught-up it also asks the node's Status, and the other members' nodes (the
peers of node.toml, over the same mutual TLS, as the node itself dials them) for their
heights, and requires that the node follows a leader (or is it), that enough peers
answered to make a majority with it, and that it is no more than --max-lag-blocks behind
the highest of them: what a rolling restart waits for before it moves to the next node.
The node's own view alone cannot tell: just after a restart it knows neither its peers'
heights nor the latest attestations. Health alone needs no quorum (a node serves as soon
as it listens).
"""

from __future__ import annotations

import ipaddress
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import click
import grpc
from cryptography import x509
from grpc_health.v1 import health_pb2, health_pb2_grpc

from exchange.client import map_rpc_error
from exchange.errors import NotAvailable
from exchange.identity.config import NodeConfig, format_address, load_node_config, parse_address
from exchange.identity.tls import load_certificate
from exchange.v1 import node_pb2, node_pb2_grpc, peer_pb2, peer_pb2_grpc

TIMEOUT_S_DEFAULT = 5.0
# Blocks a node may trail the highest of its peers and still count as caught up. The
# peers are asked first and the node last, so under load (a block every few tens of
# milliseconds) a node that keeps up is measured a moment after them, not before.
MAX_LAG_BLOCKS_DEFAULT = 2
LIVE_ROLES = ("leader", "follower")
# Where to dial a node that listens on every address.
_ANY_TO_LOOPBACK = {"0.0.0.0": "127.0.0.1", "::": "::1"}


class NodeUnhealthy(NotAvailable):
    """The node answered, but not SERVING, or not caught up with the network."""

    code = "NODE_UNHEALTHY"


@dataclass(frozen=True)
class HealthReport:
    agency: str
    address: str
    status: str  # grpc.health.v1 status name, e.g. SERVING
    role: str = ""
    term: int = 0
    leader: str = ""
    height: int = 0
    final_height: int = 0
    network_height: int = 0  # the highest height the node or an answering peer holds
    peers_answered: int = 0
    lag_blocks: int = 0

    def line(self) -> str:
        if not self.role:
            return f"{self.status}: node {self.agency} at {self.address}"
        leads = "leader" if self.role == "leader" else f"follower of {self.leader}"
        return (f"{self.status}, caught up: node {self.agency} at {self.address}, {leads}, "
                f"term {self.term}, height {self.height} of {self.network_height} "
                f"({self.peers_answered} peers answered)")


def dial_address(listen: str) -> str:
    """The address to reach a node listening on `listen` from its own machine."""
    host, port = parse_address(listen)
    return format_address(_ANY_TO_LOOPBACK.get(host, host), port)


def certificate_names(cert: x509.Certificate) -> list[str]:
    """The DNS names and IP addresses a certificate is valid for, in its order."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    names: list[str] = []
    for entry in san:
        if isinstance(entry, x509.DNSName):
            names.append(entry.value)
        elif isinstance(entry, x509.IPAddress):
            names.append(str(entry.value))
    return names


def _tls_name(dial_host: str, own_names: list[str]) -> str | None:
    """The name to check the server's certificate against, when the dialled host is not
    one of the names of the node's own certificate (e.g. the node listens on an
    interface address its certificate does not name): the certificate's first name."""
    try:
        dial_host = str(ipaddress.ip_address(dial_host.strip("[]")))
    except ValueError:
        dial_host = dial_host.lower()
    if dial_host in own_names or not own_names:
        return None
    return own_names[0]


def _credentials(config: NodeConfig) -> tuple[grpc.ChannelCredentials, list[str]]:
    """Mutual TLS as the node itself: its certificate and key, trusting exactly the
    member CAs of genesis; and the names its own certificate carries."""
    cert_pem = config.paths.tls_cert.read_bytes()
    credentials = grpc.ssl_channel_credentials(
        root_certificates=config.read_trust_bundle(),
        private_key=config.paths.tls_key.read_bytes(), certificate_chain=cert_pem)
    return credentials, certificate_names(load_certificate(cert_pem))


def _own_channel(address: str, credentials: grpc.ChannelCredentials,
                 own_names: list[str]) -> grpc.Channel:
    host, _ = parse_address(address)
    options: list[tuple[str, Any]] = []
    override = _tls_name(host, own_names)
    if override is not None:
        options.append(("grpc.ssl_target_name_override", override))
    return grpc.secure_channel(address, credentials, options=options)


def peer_heights(config: NodeConfig, credentials: grpc.ChannelCredentials,
                 timeout_s: float) -> dict[str, int]:
    """The height each peer of node.toml reports (Peer.Status), asked all at once; peers
    that do not answer in time, or answer as another agency, are left out."""
    channels = {agency: grpc.secure_channel(address, credentials)
                for agency, address in sorted(config.peers.items())}
    try:
        calls = {}
        for agency, channel in channels.items():
            stub: Any = peer_pb2_grpc.PeerStub(channel)
            calls[agency] = stub.Status.future(peer_pb2.PeerStatusRequest(), timeout=timeout_s)
        heights: dict[str, int] = {}
        for agency, call in calls.items():
            try:
                answer: peer_pb2.PeerStatus = call.result()
            except grpc.RpcError:
                continue
            if answer.agency == agency:
                heights[agency] = answer.height
        return heights
    finally:
        for channel in channels.values():
            channel.close()


def check_health(config: NodeConfig, *, service: str = "", caught_up: bool = False,
                 max_lag_blocks: int = MAX_LAG_BLOCKS_DEFAULT,
                 timeout_s: float = TIMEOUT_S_DEFAULT) -> HealthReport:
    """Ask the node `config` describes whether it serves (and is caught up); raise
    NodeUnhealthy or a client error saying why not."""
    assert timeout_s > 0 and max_lag_blocks >= 0
    address = dial_address(config.listen_grpc)
    who = f"node {config.agency} at {address}"
    credentials, own_names = _credentials(config)
    with _own_channel(address, credentials, own_names) as channel:
        stub: Any = health_pb2_grpc.HealthStub(channel)
        try:
            answer = stub.Check(health_pb2.HealthCheckRequest(service=service),
                                timeout=timeout_s)
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.NOT_FOUND:
                raise NodeUnhealthy(f"{who} does not know the health service "
                                    f"{service!r}") from None
            raise map_rpc_error(exc, address, timeout_s) from None
        status = health_pb2.HealthCheckResponse.ServingStatus.Name(answer.status)
        if answer.status != health_pb2.HealthCheckResponse.SERVING:
            raise NodeUnhealthy(f"{who} is {status}")
        if not caught_up:
            return HealthReport(config.agency, address, status)
        heights = peer_heights(config, credentials, timeout_s)
        exchange: Any = node_pb2_grpc.ExchangeStub(channel)
        try:
            st: node_pb2.NodeStatus = exchange.Status(node_pb2.StatusRequest(),
                                                      timeout=timeout_s)
        except grpc.RpcError as exc:
            raise map_rpc_error(exc, address, timeout_s) from None
    if st.agency != config.agency:
        raise NodeUnhealthy(f"the node at {address} is {st.agency!r}, not {config.agency!r}")
    if st.role not in LIVE_ROLES or not st.leader:
        raise NodeUnhealthy(f"{who} is serving but not caught up: no leader "
                            f"(role {st.role or '-'}, term {st.term})")
    majority = (len(config.peers) + 1) // 2 + 1
    if len(heights) + 1 < majority:
        raise NodeUnhealthy(
            f"{who} is serving, but only {len(heights)} of its {len(config.peers)} peers "
            f"answered ({', '.join(sorted(heights)) or 'none'}): cannot tell whether it "
            f"is caught up")
    network = max([st.height, st.final_height, *heights.values()])
    lag = network - st.height
    if lag > max_lag_blocks:
        raise NodeUnhealthy(f"{who} is serving but not caught up: height {st.height}, "
                            f"{lag} blocks behind {network} (at most {max_lag_blocks} allowed)")
    return HealthReport(config.agency, address, status, role=st.role, term=st.term,
                        leader=st.leader, height=st.height, final_height=st.final_height,
                        network_height=network, peers_answered=len(heights), lag_blocks=lag)


@click.command("health")
@click.option("--config", "config_path", type=click.Path(path_type=Path, dir_okay=False),
              required=True, help="The node's node.toml (as `exchange node` runs it).")
@click.option("--service", default="", show_default=True,
              help="grpc.health.v1 service name to check (\"\" is the whole node).")
@click.option("--caught-up", is_flag=True,
              help="Also require a leader, a majority of members answering (the "
                   "peers are asked directly), and no more than --max-lag-blocks behind "
                   "the highest height among them.")
@click.option("--max-lag-blocks", type=click.IntRange(0, 1_000_000),
              default=MAX_LAG_BLOCKS_DEFAULT, show_default=True)
@click.option("--timeout", "timeout_s", type=click.FloatRange(0.1, 600.0),
              default=TIMEOUT_S_DEFAULT, show_default=True,
              help="Deadline of each call, in seconds.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object on stdout.")
def health(config_path: Path, service: str, caught_up: bool, max_lag_blocks: int,
           timeout_s: float, as_json: bool) -> None:
    """Check this machine's node through the gRPC health service (mutual TLS with the
    node's own certificate): exit 0 when SERVING, 1 otherwise."""
    config = load_node_config(config_path)
    report = check_health(config, service=service, caught_up=caught_up,
                          max_lag_blocks=max_lag_blocks, timeout_s=timeout_s)
    if as_json:
        json.dump(asdict(report), sys.stdout, sort_keys=True)
        sys.stdout.write("\n")
    else:
        click.echo(report.line())
