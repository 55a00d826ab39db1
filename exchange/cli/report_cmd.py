"""`exchange evidence report`: a verified evidence bundle as a page a judge can read.

The bundle is verified first; a bundle that fails writes no HTML at all (an existing
file at OUT is left as it was) and exits 1 naming the part that failed, so no page can
claim a verification that did not happen.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

import click

from exchange.cli.evidence_cmd import evidence
from exchange.cli.output import emit_json
from exchange.ledger.evidence import BundleInvalid
from exchange.ledger.report import build_report, render_html


def _write_atomically(path: Path, text: str) -> None:
    """Write `text` to `path` so that a reader sees the old file or the whole new one."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp",
                               dir=path.parent if str(path.parent) else ".")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # as a plainly created file, not mkstemp's 0600
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@evidence.command("report")
@click.argument("file", type=click.Path(path_type=Path, exists=True, dir_okay=False))
@click.option("--html", "html_out", type=click.Path(path_type=Path, dir_okay=False),
              help="Write the report as one self-contained HTML page.")
@click.option("--json", "as_json", is_flag=True, help="Print the report model as JSON.")
def report_cmd(file: Path, html_out: Path | None, as_json: bool) -> None:
    """Verify a bundle offline, then render what verified for a reader: the chain, a
    timeline in chain order, who asked whom, and revealed rows. Exits 1 without writing
    anything if the bundle does not verify."""
    if html_out is None and not as_json:
        raise click.UsageError("give --html OUT, --json, or both")
    data = file.read_bytes()
    try:
        report = build_report(data, verified_at_ms=int(time.time() * 1000),
                              bundle_name=file.name)
    except BundleInvalid as exc:
        if as_json:
            emit_json({"ok": False, "where": exc.where, "error": str(exc)})
        click.echo(f"error: evidence invalid, no report written: {exc}", err=True)
        sys.exit(1)
    if html_out is not None:
        _write_atomically(html_out, render_html(report))
        click.echo(f"wrote {html_out}: {report.verification} "
                   f"(bundle SHA-256 {report.bundle_sha256})", err=as_json)
    if as_json:
        emit_json({"ok": True, **report.as_dict()})
