"""`exchange console`: the analysts' web console for the profile's person, served by
this process on loopback. The profile's key is unlocked once here (the passphrase is
asked in the terminal) and never leaves the process; the browser signs in with the
one-time token in the printed URL."""

from __future__ import annotations

import ipaddress
import os
import signal
import socket
import sys
from pathlib import Path

import click

from exchange.errors import MalformedInput

PORT_DEFAULT = 8470
LOOPBACK = "127.0.0.1"


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _passphrase(profile_path: Path) -> bytes | None:
    """The key's passphrase: from the profile's environment variable when set, else
    asked once in the terminal when the key is encrypted (None for a plain key)."""
    from exchange.client import load_client_profile
    from exchange.identity.keys import read_signing_key

    profile = load_client_profile(profile_path)
    if profile.passphrase_env and os.environ.get(profile.passphrase_env) is not None:
        return os.environ[profile.passphrase_env].encode()
    try:
        read_signing_key(profile.signing_key, None)
        return None
    except MalformedInput:
        pass  # encrypted: ask
    if not sys.stdin.isatty():
        raise MalformedInput(f"{profile.signing_key} is encrypted and there is no terminal "
                             "to ask its passphrase in")
    for _ in range(3):
        text = click.prompt(f"passphrase of {profile.agency}/{profile.subject}'s key",
                            hide_input=True, err=True)
        try:
            read_signing_key(profile.signing_key, str(text).encode())
            return str(text).encode()
        except MalformedInput:
            click.echo("wrong passphrase", err=True)
    raise MalformedInput("three wrong passphrases")


def _write_url(path: Path | None, url: str) -> None:
    """The sign-in URL, readable by its owner only."""
    if path is None:
        return
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(url + "\n")


@click.command("console")
@click.option("--profile", "profile_option", default=None,
              help="The person's profile (default: $EXCHANGE_PROFILE).")
@click.option("--evidence-only", is_flag=True,
              help="No profile: only the evidence page (for a court clerk).")
@click.option("--host", default=LOOPBACK, show_default=True,
              help="Address to listen on; anything but loopback needs --allow-remote.")
@click.option("--allow-remote", is_flag=True,
              help="Listen on a non-loopback address (the token still guards it).")
@click.option("--port", type=click.IntRange(0, 65_535), default=PORT_DEFAULT,
              show_default=True, help="Port (0: any free port).")
@click.option("--timezone", default="Asia/Shanghai", show_default=True,
              help="The time zone dates are shown in (an IANA name).")
@click.option("--url-file", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="Also write the sign-in URL to this file (mode 0600).")
def console_command(profile_option: str | None, evidence_only: bool, host: str,
                    allow_remote: bool, port: int, timezone: str,
                    url_file: Path | None) -> None:
    """Serve the web console: network, ask, four eyes, findings, cases with their graph,
    audit, chain, live events and evidence, in Chinese or English. Prints a URL with a
    one-time token; the page it opens keeps a session cookie."""
    import uvicorn

    from exchange.client import resolve_profile_path
    from exchange.console.app import create_app
    from exchange.console.security import Gate
    from exchange.console.session import connect_person

    if not _is_loopback(host) and not allow_remote:
        raise click.UsageError(f"{host} is not a loopback address: pass --allow-remote to "
                               "serve the console beyond this machine")
    from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

    try:
        ZoneInfo(timezone)
    except (ZoneInfoNotFoundError, ValueError) as exc:
        raise click.UsageError(f"{timezone!r} is not a time zone (e.g. Asia/Shanghai)") \
            from exc
    person = None
    if not evidence_only:
        profile_path = resolve_profile_path(profile_option)
        person = connect_person(profile_path, _passphrase(profile_path))
        person.client.status()  # the node answers, or a clear error now
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        raise MalformedInput(f"cannot listen on {host}:{port}: {exc.strerror}") from exc
    sock.listen(128)  # connections wait from now on, before the URL is printed
    bound = sock.getsockname()[1]
    shown = f"[{host}]" if ":" in host else host
    hosts = {f"{shown}:{bound}", f"localhost:{bound}"}
    if _is_loopback(host):
        hosts |= {f"127.0.0.1:{bound}", f"[::1]:{bound}"}
    gate = Gate()
    app = create_app(person, gate, frozenset(hosts), timezone)
    url = f"http://{shown}:{bound}/?token={gate.token}"
    who = f"{person.agency}/{person.subject}" if person else "evidence only"
    click.echo(f"console of {who}: {url}", err=False)
    click.echo(f"(the token signs one browser in, then is spent: `kill -USR1 {os.getpid()}` "
               "prints a new one; Ctrl-C stops the console)", err=True)
    sys.stdout.flush()
    _write_url(url_file, url)

    def fresh_token(signum: int, frame: object) -> None:
        fresh = f"http://{shown}:{bound}/?token={gate.new_token()}"
        click.echo(f"console of {who}: {fresh}")
        sys.stdout.flush()
        _write_url(url_file, fresh)

    signal.signal(signal.SIGUSR1, fresh_token)
    config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off")
    server = uvicorn.Server(config)
    try:
        server.run(sockets=[sock])
    finally:
        if person is not None:
            person.client.close()
