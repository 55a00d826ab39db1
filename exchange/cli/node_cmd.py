"""`exchange node --config FILE`: run one agency's node."""

from __future__ import annotations

import time
from pathlib import Path

import click
import uvloop

from exchange.identity.config import NodeConfig, load_node_config, read_signed_genesis
from exchange.ledger.store import BlockStore


@click.command("node")
@click.option("--config", "config_path", type=click.Path(path_type=Path, exists=True,
                                                          dir_okay=False), required=True,
              help="The node's TOML config (exchange init writes one per agency).")
@click.option("--rebuild-state", is_flag=True,
              help="Before serving, rebuild the applied ledger state from every stored "
                   "block, check it equal to the stored state and store it.")
def node(config_path: Path, rebuild_state: bool) -> None:
    """Run an agency node until SIGTERM or SIGINT."""
    from exchange.node import logs
    from exchange.node.server import serve

    config = load_node_config(config_path)
    logs.configure(config.log_level)
    if rebuild_state:
        _rebuild_state(config)
    # uvloop: the Raft link's TLS frames and the loop's own work cost 10-13 % less node
    # CPU per transaction than on asyncio's default loop (BENCHMARKS.md, issue 20)
    uvloop.run(serve(config, ready=logs.bind_node))


def _rebuild_state(config: NodeConfig) -> None:
    """Replay the node's blocks into a fresh state, compare, store; say what was found."""
    from exchange.ledger.apply import rebuild_state

    path = config.paths.data_dir / "blocks.db"
    if not path.exists():
        click.echo(f"state: no block store at {path} yet; nothing to rebuild", err=True)
        return
    with BlockStore.create(path, read_signed_genesis(config.paths.genesis)) as store:
        started = time.perf_counter()
        outcome = rebuild_state(store)
        elapsed_s = time.perf_counter() - started
    digest = outcome.rebuilt_digest.hex()
    click.echo(f"state rebuilt from {outcome.height} blocks in {elapsed_s:.1f} s: "
               f"digest {digest}", err=True)
    if outcome.checkpoint_height is None:
        click.echo("state: there was no stored state to compare with", err=True)
    elif outcome.checkpoint_refused:
        click.echo(f"state: the stored state was unusable ({outcome.checkpoint_refused}); "
                   "replaced by the rebuilt one", err=True)
    elif outcome.agrees:
        click.echo(f"state: the stored state (checkpoint at height "
                   f"{outcome.checkpoint_height}) is equal", err=True)
    else:
        stored = outcome.stored_digest.hex() if outcome.stored_digest else "-"
        click.echo(f"state: the stored state (checkpoint at height "
                   f"{outcome.checkpoint_height}) DIFFERED: digest {stored}; replaced by "
                   "the rebuilt one", err=True)
