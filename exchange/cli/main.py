"""The `exchange` command line. Each command group lives in its own module; errors are
mapped here, once, to one readable line and a non-zero exit."""

from __future__ import annotations

import sys

import click

from exchange.errors import ExchangeError

EXIT_INVALID = 1  # verification failed / bad input
EXIT_USAGE = 2


class ExchangeGroup(click.Group):
    """Turns domain errors into one line on stderr and exit code 1."""

    def invoke(self, ctx: click.Context) -> object:
        try:
            return super().invoke(ctx)
        except ExchangeError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(EXIT_INVALID)
        except (FileNotFoundError, PermissionError, IsADirectoryError) as exc:
            click.echo(f"error: {exc.strerror}: {exc.filename}", err=True)
            sys.exit(EXIT_INVALID)


@click.group(cls=ExchangeGroup)
@click.version_option(package_name="exchange")
def cli() -> None:
    """Four-agency information exchange: signed cross-queries on a shared evidence ledger."""


def _register() -> None:
    from exchange.cli import chain_cmd, evidence_cmd, init_cmd, node_cmd

    cli.add_command(init_cmd.init)
    cli.add_command(node_cmd.node)
    cli.add_command(chain_cmd.chain)
    cli.add_command(evidence_cmd.evidence)

    from exchange.cli import node_cmds

    cli.add_command(node_cmds.status)
    cli.add_command(node_cmds.tx)
    cli.add_command(node_cmds.block)
    cli.add_command(node_cmds.submit_probe)


def main() -> None:
    _register()
    cli(prog_name="exchange")


if __name__ == "__main__":
    main()
