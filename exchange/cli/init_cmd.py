"""`exchange init`: write a whole local network (keys, TLS, credentials, genesis, configs)."""

from __future__ import annotations

from pathlib import Path

import click

from exchange.cli.output import emit_json
from exchange.identity.local_network import init_network
from exchange.identity.network import DEFAULT_AGENCIES


def _agency_list(text: str) -> list[str]:
    return [name.strip() for name in text.split(",")]


@click.command("init")
@click.option("--out", "out_dir", type=click.Path(path_type=Path, file_okay=False),
              default=Path("deploy/local"), show_default=True,
              help="Folder to write the network into.")
@click.option("--agencies", default=",".join(DEFAULT_AGENCIES), show_default=True,
              help="Comma-separated member agencies.")
@click.option("--chain-id", default=None,
              help="Chain id (default: shenzhen-exchange-<random hex>).")
@click.option("--base-port", type=click.IntRange(1, 65535), default=7100, show_default=True,
              help="gRPC port of the first agency; agency i gets base + 10*i, metrics +1.")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Host the nodes listen on and peers dial (also put in node certificates).")
@click.option("--force", is_flag=True, help="Replace an existing network in --out.")
@click.option("--passphrase-env", default=None, metavar="VAR",
              help="Encrypt the analysts' and automations' signing keys with the passphrase "
                   "in this environment variable; their profiles name it.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def init(out_dir: Path, agencies: str, chain_id: str | None, base_port: int, host: str,
         force: bool, passphrase_env: str | None, as_json: bool) -> None:
    """Write a local network: genesis signed by every member, and per agency its keys,
    TLS CA and certificates, analyst credentials, node.toml and profile.toml."""
    layout = init_network(out_dir, _agency_list(agencies), chain_id=chain_id,
                          base_port=base_port, host=host, overwrite=force,
                          passphrase_env=passphrase_env)
    if as_json:
        emit_json({
            "chain_id": layout.chain_id,
            "out_dir": str(layout.out_dir),
            "genesis": str(layout.genesis),
            "genesis_hash": layout.genesis_hash.hex(),
            "agencies": [{"agency": a.agency, "grpc": a.grpc_address,
                          "metrics": a.metrics_address, "node_config": str(a.node_config),
                          "profile": str(a.profile)} for a in layout.agencies],
        })
        return
    click.echo(f"chain id     {layout.chain_id}")
    click.echo(f"genesis      {layout.genesis} (sha256 {layout.genesis_hash.hex()[:16]}...)")
    click.echo(f"agencies     {', '.join(a.agency for a in layout.agencies)}")
    for a in layout.agencies:
        click.echo(f"  {a.agency:<10} grpc {a.grpc_address:<21} metrics {a.metrics_address:<21} "
                   f"config {a.node_config}")
        click.echo(f"  {'':<10} profile {a.profile}")
    click.echo("root keys (keys/root.key) belong offline in production.")
