"""`exchange agency` and `exchange genesis`: the key ceremony, one agency per machine.

    exchange agency init --agency tax --host 10.0.0.1 --chain-id CHAIN --out DIR
    exchange genesis propose tax.req police.req customs.req pboc.req --out draft.pb
    exchange genesis sign draft.pb --agency-dir DIR --out tax.sig      (on each machine)
    exchange genesis finalize draft.pb *.sig --out genesis.pb
    exchange agency configure --agency-dir DIR --genesis genesis.pb
"""

from __future__ import annotations

import time
from pathlib import Path

import click

from exchange.cli.output import emit_json
from exchange.identity import ceremony
from exchange.identity.genesis import DEFAULT_PARAMS
from exchange.identity.network import passphrase_from_env, write_public
from exchange.v1 import identity_pb2

_PATH = click.Path(path_type=Path, dir_okay=False, exists=True)
_DIR = click.Path(path_type=Path, file_okay=False, exists=True)


@click.group("agency")
def agency() -> None:
    """One agency's part of the key ceremony, run on its own machine."""


@agency.command("init")
@click.option("--agency", "name", required=True, help="The agency's name (e.g. tax).")
@click.option("--host", required=True,
              help="Address peers dial this node at (IP or DNS name; put in its certificate).")
@click.option("--chain-id", required=True,
              help="The network's chain id, agreed by the founding agencies beforehand.")
@click.option("--out", "out_dir", required=True,
              type=click.Path(path_type=Path, file_okay=False),
              help="Folder to create for this agency's keys and files.")
@click.option("--port", type=click.IntRange(1, 65535), default=7100, show_default=True,
              help="gRPC port (peers and analysts).")
@click.option("--metrics-port", type=click.IntRange(1, 65535), default=None,
              help="Prometheus metrics port (default: --port + 1).")
@click.option("--listen-host", default=None,
              help="Address to listen on (default: --host; 0.0.0.0 for every interface).")
@click.option("--display-name", default=None, help="The agency's full name.")
@click.option("--passphrase-env", default=None, metavar="VAR",
              help="Encrypt the analysts' and automation's keys with the passphrase in "
                   "this environment variable.")
@click.option("--root-passphrase-env", default=None, metavar="VAR",
              help="Encrypt the root key with the passphrase in this environment variable "
                   "(genesis sign, membership approve and agency rotate then need it).")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def init(name: str, host: str, chain_id: str, out_dir: Path, port: int,
         metrics_port: int | None, listen_host: str | None, display_name: str | None,
         passphrase_env: str | None, root_passphrase_env: str | None, as_json: bool) -> None:
    """Make this agency's root, node and data keys, TLS CA and certificates, first
    analyst, supervisor and automation identities, and its signed membership request
    (request.pb: public, to be sent to the coordinator)."""
    material, _ = ceremony.agency_init(
        out_dir, name, host, chain_id, port=port, metrics_port=metrics_port,
        listen_host=listen_host, display_name=display_name,
        passphrase=passphrase_from_env(passphrase_env), passphrase_env=passphrase_env,
        now_ms=int(time.time() * 1000), root_passphrase=passphrase_from_env(root_passphrase_env))
    request = material.paths.dir / ceremony.REQUEST_FILE
    if as_json:
        emit_json({"agency": name, "chain_id": chain_id, "dir": str(material.paths.dir),
                   "request": str(request), "address": material.member.address})
        return
    click.echo(f"agency       {name} ({material.member.display_name})")
    click.echo(f"folder       {material.paths.dir}")
    click.echo(f"request      {request}  (public: send it to the coordinator)")
    click.echo(f"address      {material.member.address}")
    click.echo("keys/root.key signs genesis and membership changes: keep it offline.")


@agency.command("configure")
@click.option("--agency-dir", required=True, type=_DIR, help="The folder `agency init` made.")
@click.option("--genesis", "genesis_path", required=True, type=_PATH,
              help="The final genesis.pb, signed by every founding member.")
@click.option("--force", is_flag=True, help="Replace an existing node.toml and profiles.")
@click.option("--join", is_flag=True,
              help="This agency joins a running network (it is not in genesis; a "
                   "membership change approved by the members adds it).")
@click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]),
              default="info", show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def configure(agency_dir: Path, genesis_path: Path, force: bool, join: bool,
              log_level: str, as_json: bool) -> None:
    """Check the final genesis against this agency's own keys, then write node.toml and
    the analysts' profiles."""
    config = ceremony.configure_agency(agency_dir, genesis_path, overwrite=force,
                                       log_level=log_level, join=join)
    if as_json:
        emit_json({"agency": config.agency, "node_config": str(agency_dir / "node.toml"),
                   "listen_grpc": config.listen_grpc, "listen_metrics": config.listen_metrics,
                   "peers": dict(sorted(config.peers.items())), "join": join})
        return
    click.echo(f"node config  {agency_dir / 'node.toml'}")
    click.echo(f"listen       grpc {config.listen_grpc}  metrics {config.listen_metrics}")
    click.echo(f"peers        {', '.join(f'{a} {addr}' for a, addr in sorted(config.peers.items()))}")
    click.echo(f"start with   exchange node --config {agency_dir / 'node.toml'}")


@click.group("genesis")
def genesis() -> None:
    """Assemble, sign and finalize the genesis of a new network."""


def _print_draft(draft_info: dict[str, object]) -> None:
    click.echo(f"chain id      {draft_info['chain_id']}")
    click.echo(f"genesis hash  {draft_info['genesis_hash']}")
    members = draft_info["members"]
    assert isinstance(members, list)
    for m in members:
        click.echo(f"  {m['agency']:<10} {m['address']:<22} root {m['root_key_id'][:16]}  "
                   f"node {m['node_key_id'][:16]}  ca {m['tls_ca_sha256'][:16]}")
    click.echo(f"credentials   {draft_info['credentials']}   policies {draft_info['policies']}")
    limits = draft_info.get("rate_limits")
    if isinstance(limits, dict):
        click.echo("rate limits   " + ", ".join(f"{k} {v}" for k, v in limits.items()))


@genesis.command("propose")
@click.argument("requests", nargs=-1, required=True, type=_PATH)
@click.option("--out", "out_path", required=True,
              type=click.Path(path_type=Path, dir_okay=False), help="Draft genesis to write.")
@click.option("--no-probes", is_flag=True,
              help="Refuse probe (test) transactions on this network (a production "
                   "network; genesis parameter rate_limits.probes_disabled).")
@click.option("--json", "as_json", is_flag=True)
def propose(requests: tuple[Path, ...], out_path: Path, no_probes: bool,
            as_json: bool) -> None:
    """Assemble a draft genesis from the founding agencies' membership requests."""
    parsed = [ceremony.read_request(path) for path in requests]
    params = identity_pb2.ChainParams()
    params.CopyFrom(DEFAULT_PARAMS)
    params.rate_limits.probes_disabled = no_probes
    draft = ceremony.propose_genesis(parsed, int(time.time() * 1000), params)
    write_public(out_path, draft.SerializeToString(deterministic=True))
    info = ceremony.describe_draft(draft)
    if as_json:
        emit_json({**info, "draft": str(out_path)})
        return
    _print_draft(info)
    click.echo(f"draft         {out_path}  (each agency signs it: exchange genesis sign)")


@genesis.command("sign")
@click.argument("draft_path", metavar="DRAFT", type=_PATH)
@click.option("--agency-dir", required=True, type=_DIR, help="This agency's folder.")
@click.option("--out", "out_path", required=True,
              type=click.Path(path_type=Path, dir_okay=False), help="Signature file to write.")
@click.option("--root-passphrase-env", default=None, metavar="VAR",
              help="Environment variable holding the root key's passphrase, if encrypted.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def sign(draft_path: Path, agency_dir: Path, out_path: Path,
         root_passphrase_env: str | None, as_json: bool) -> None:
    """Sign the draft with this agency's root key, after checking it names this agency
    with its own keys and address."""
    draft = ceremony.read_draft(draft_path)
    signature = ceremony.sign_draft(draft, agency_dir, passphrase_from_env(root_passphrase_env))
    write_public(out_path, signature.SerializeToString(deterministic=True))
    if as_json:
        emit_json({**ceremony.describe_draft(draft), "signer": signature.agency,
                   "signature": str(out_path)})
        return
    _print_draft(ceremony.describe_draft(draft))
    click.echo(f"signed by     {signature.agency}  ->  {out_path}")


@genesis.command("finalize")
@click.argument("draft_path", metavar="DRAFT", type=_PATH)
@click.argument("signatures", nargs=-1, required=True, type=_PATH)
@click.option("--out", "out_path", required=True,
              type=click.Path(path_type=Path, dir_okay=False), help="genesis.pb to write.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def finalize(draft_path: Path, signatures: tuple[Path, ...], out_path: Path,
             as_json: bool) -> None:
    """Join the draft and every founding member's signature into the final genesis."""
    draft = ceremony.read_draft(draft_path)
    signed = ceremony.finalize_genesis(draft, [ceremony.read_signature(p) for p in signatures])
    described = ceremony.write_genesis(out_path, signed)
    info = ceremony.describe_draft(signed)
    if as_json:
        emit_json({**info, "genesis": str(out_path), "description": str(described)})
        return
    _print_draft(info)
    click.echo(f"genesis       {out_path}  (description {described})")
    click.echo(f"signed by     {', '.join(info['signed_by'])}")


__all__ = ["agency", "genesis"]
