"""`exchange init`: the key ceremony's steps (exchange.identity.ceremony), all on one
machine, for a whole local network, into a temporary folder renamed into place only
when complete. The building blocks are exchange.identity.network's; this module sits
above both, so the ceremony and the network builder do not import each other.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from exchange.errors import AlreadyExists, MalformedInput
from exchange.identity import ceremony
from exchange.identity.config import RAFT_PORT_OFFSET, format_address
from exchange.identity.genesis import DEFAULT_PARAMS, genesis_hash
from exchange.identity.network import (
    DEFAULT_AGENCIES,
    DIR_MODE,
    GENESIS_FILE,
    GENESIS_JSON_FILE,
    METRICS_PORT_OFFSET,
    PORT_STRIDE,
    AgencyLayout,
    AgencyPaths,
    NetworkLayout,
    new_chain_id,
    passphrase_from_env,
    validate_agencies,
    validate_chain_id,
    validate_host,
)
from exchange.v1 import identity_pb2


def _check_target(out_dir: Path, overwrite: bool) -> bool:
    """Whether out_dir holds something to replace; refuse unless it may be replaced."""
    if not out_dir.exists() and not out_dir.is_symlink():
        return False
    if not out_dir.is_dir() or out_dir.is_symlink():
        raise AlreadyExists(f"{out_dir} exists and is not a folder")
    if not any(out_dir.iterdir()):
        return False
    if not overwrite:
        raise AlreadyExists(f"{out_dir} already exists (use --force to replace it)")
    if not (out_dir / GENESIS_FILE).is_file():
        raise AlreadyExists(
            f"{out_dir} is not empty and holds no {GENESIS_FILE}; refusing to replace it")
    return True


def _fsync_tree(root: Path) -> None:
    for dirpath, _dirnames, filenames in os.walk(root):
        for name in filenames:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(dirpath))


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _build(work: Path, agencies: Sequence[str], chain_id: str, base_port: int, host: str,
           now_ms: int, passphrase_env: str | None
           ) -> tuple[identity_pb2.SignedGenesis, list[tuple[str, str]]]:
    """The key ceremony's steps, all on this machine: each agency's keys and request,
    the draft, every root's signature, the final genesis, each agency's configuration."""
    passphrase = passphrase_from_env(passphrase_env)
    requests: list[identity_pb2.MembershipRequest] = []
    listen: list[tuple[str, str]] = []
    for i, agency in enumerate(agencies):
        grpc_port = base_port + PORT_STRIDE * i
        _, request = ceremony.agency_init(
            work / agency, agency, host, chain_id, port=grpc_port,
            passphrase=passphrase, passphrase_env=passphrase_env, now_ms=now_ms)
        requests.append(request)
        listen.append((format_address(host, grpc_port),
                       format_address(host, grpc_port + METRICS_PORT_OFFSET)))
    draft = ceremony.propose_genesis(requests, now_ms, DEFAULT_PARAMS)
    signatures = [ceremony.sign_draft(draft, work / agency) for agency in agencies]
    signed = ceremony.finalize_genesis(draft, signatures)
    genesis_path = work / GENESIS_FILE
    ceremony.write_genesis(genesis_path, signed)
    for agency in agencies:
        ceremony.configure_agency(work / agency, genesis_path)
    return signed, listen


def init_network(out_dir: Path, agencies: Sequence[str] = DEFAULT_AGENCIES,
                 chain_id: str | None = None, base_port: int = 7100,
                 host: str = "127.0.0.1", overwrite: bool = False,
                 now_ms: int | None = None,
                 passphrase_env: str | None = None) -> NetworkLayout:
    """Write a whole local network under `out_dir`: genesis signed by every member,
    each agency's keys, TLS material, credentials, node config and profile.

    Refuses (AlreadyExists) when out_dir is not empty unless `overwrite`; even then only
    a folder holding a genesis is replaced. Everything is written into a temporary
    folder beside out_dir and renamed into place at the end, so a failure leaves
    out_dir as it was.

    With `passphrase_env`, every analyst, supervisor and automation signing key is
    written encrypted with the passphrase held in that environment variable, and the
    profiles name the variable (decision 5); without it they are written in clear, which
    suits only a local test network.
    """
    names = validate_agencies(agencies)
    chain = validate_chain_id(chain_id if chain_id is not None else new_chain_id())
    validate_host(host)
    last_port = (base_port + PORT_STRIDE * (len(names) - 1)
                 + max(METRICS_PORT_OFFSET, RAFT_PORT_OFFSET))
    if base_port < 1 or last_port > 65535:
        raise MalformedInput(f"ports {base_port}..{last_port} do not fit in 1..65535")
    created_ms = int(time.time() * 1000) if now_ms is None else now_ms

    out_dir = Path(os.path.normpath(out_dir.absolute()))
    replace = _check_target(out_dir, overwrite)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.init-", dir=out_dir.parent))
    try:
        os.chmod(work, DIR_MODE)
        signed, listen = _build(work, names, chain, base_port, host, created_ms,
                                passphrase_env)
        _fsync_tree(work)
        _swap_into_place(work, out_dir, replace)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    _fsync_dir(out_dir.parent)

    return NetworkLayout(
        out_dir=out_dir, chain_id=chain, genesis=out_dir / GENESIS_FILE,
        genesis_json=out_dir / GENESIS_JSON_FILE, genesis_hash=genesis_hash(signed),
        agencies=tuple(
            AgencyLayout(agency=a, dir=out_dir / a,
                         node_config=AgencyPaths(out_dir / a).node_config,
                         profile=AgencyPaths(out_dir / a).profile,
                         grpc_address=g, metrics_address=m)
            for a, (g, m) in zip(names, listen, strict=True)))


def _swap_into_place(work: Path, out_dir: Path, replace: bool) -> None:
    if not replace:
        try:
            # Replaces out_dir only if it is missing or an empty folder.
            os.rename(work, out_dir)
        except OSError as exc:
            raise AlreadyExists(f"{out_dir} appeared while the network was written") from exc
        return
    old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
    os.rename(out_dir, old)
    try:
        os.rename(work, out_dir)
    except BaseException:
        os.rename(old, out_dir)
        raise
    shutil.rmtree(old, ignore_errors=True)
