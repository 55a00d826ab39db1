"""`exchange node --config FILE`: run one agency's node."""

from __future__ import annotations

import asyncio
from pathlib import Path

import click

from exchange.identity.config import load_node_config


@click.command("node")
@click.option("--config", "config_path", type=click.Path(path_type=Path, exists=True,
                                                          dir_okay=False), required=True,
              help="The node's TOML config (exchange init writes one per agency).")
def node(config_path: Path) -> None:
    """Run an agency node until SIGTERM or SIGINT."""
    from exchange.node import logs
    from exchange.node.server import serve

    config = load_node_config(config_path)
    logs.configure(config.log_level)
    asyncio.run(serve(config, ready=logs.bind_node))
