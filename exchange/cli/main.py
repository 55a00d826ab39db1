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
    from exchange.cli import (
        agency_cmd,
        case_cmd,
        catalog_cmd,
        chain_cmd,
        check_cmd,
        compare_cmd,
        credential_cmd,
        data_cmd,
        evidence_cmd,
        health_cmd,
        init_cmd,
        membership_cmd,
        node_cmd,
        policy_cmd,
        query_cmd,
        report_cmd,  # noqa: F401 - attaches `evidence report` to the evidence group
        status_cmd,
    )

    for command in (init_cmd.init, node_cmd.node, status_cmd.status, status_cmd.tx,
                    status_cmd.block, status_cmd.submit_probe, chain_cmd.chain,
                    evidence_cmd.evidence, policy_cmd.policy, data_cmd.data,
                    catalog_cmd.catalog, query_cmd.query, query_cmd.answer,
                    query_cmd.audit, credential_cmd.credential, compare_cmd.rules,
                    compare_cmd.compare, compare_cmd.findings, compare_cmd.jobs,
                    case_cmd.case, health_cmd.health, agency_cmd.agency,
                    agency_cmd.genesis, check_cmd.check, membership_cmd.membership):
        cli.add_command(command)
    from exchange.cli import playbook_cmd, watch_cmd  # automatic processing (issue 10)

    for command in (playbook_cmd.playbooks, watch_cmd.watch):
        cli.add_command(command)
    from exchange.cli import console_cmd, cosign_cmd  # the web console, four eyes (issue 21)

    for command in (console_cmd.console_command, cosign_cmd.cosign):
        cli.add_command(command)


def main() -> None:
    _register()
    cli(prog_name="exchange")


if __name__ == "__main__":
    main()
