"""The key ceremony: each agency makes its keys on its own machine; only public files
travel; genesis needs every founding member's root signature."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from exchange.cli.main import ExchangeGroup, _register, cli
from exchange.errors import ExchangeError, InvalidSignature, MalformedInput
from exchange.identity import ceremony
from exchange.identity.config import load_node_config, load_profile
from exchange.identity.genesis import build_genesis, parse_genesis, verify_genesis
from exchange.identity.keys import SigningKey
from exchange.identity.network import AgencyPaths
from exchange.v1 import identity_pb2

CHAIN = "ceremony-test"
AGENCIES = ("tax", "police", "customs", "pboc")
NOW_MS = 1_790_000_000_000

_register()


def _run(*args: str) -> tuple[int, str, str]:
    assert isinstance(cli, ExchangeGroup)
    result = CliRunner().invoke(cli, list(args))
    return result.exit_code, result.stdout, result.stderr


def _init(machines: Path, agency: str, i: int, chain: str = CHAIN) -> Path:
    out = machines / agency / "exchange"
    code, _, err = _run("agency", "init", "--agency", agency, "--host", f"10.77.0.{i + 1}",
                        "--listen-host", "127.0.0.1", "--port", str(7800 + 10 * i),
                        "--chain-id", chain, "--out", str(out))
    assert code == 0, err
    return out


@pytest.fixture()
def ceremony_dirs(tmp_path: Path) -> tuple[Path, dict[str, Path]]:
    """Four "machines" (folders) with their agency's keys, and a coordinator folder
    holding copies of the public requests only."""
    machines = tmp_path / "machines"
    coordinator = tmp_path / "coordinator"
    coordinator.mkdir()
    dirs = {a: _init(machines, a, i) for i, a in enumerate(AGENCIES)}
    for agency, d in dirs.items():
        shutil.copy(d / "request.pb", coordinator / f"{agency}.req")
    return coordinator, dirs


def _draft(coordinator: Path) -> Path:
    code, out, err = _run("genesis", "propose", *sorted(map(str, coordinator.glob("*.req"))),
                          "--out", str(coordinator / "draft.pb"))
    assert code == 0, err
    assert CHAIN in out
    return coordinator / "draft.pb"


def _sign_all(coordinator: Path, dirs: dict[str, Path], draft: Path) -> list[Path]:
    sigs = []
    for agency, d in dirs.items():
        sig = coordinator / f"{agency}.sig"
        code, _, err = _run("genesis", "sign", str(draft), "--agency-dir", str(d),
                            "--out", str(sig))
        assert code == 0, err
        sigs.append(sig)
    return sigs


def test_ceremony_through_the_cli_gives_each_agency_a_node_config(
        ceremony_dirs: tuple[Path, dict[str, Path]]) -> None:
    coordinator, dirs = ceremony_dirs
    # what travels is public: no private key in the coordinator's folder
    for req in coordinator.glob("*.req"):
        assert b"PRIVATE KEY" not in req.read_bytes()
    draft = _draft(coordinator)
    sigs = _sign_all(coordinator, dirs, draft)
    code, _, err = _run("genesis", "finalize", str(draft), *map(str, sigs),
                        "--out", str(coordinator / "genesis.pb"))
    assert code == 0, err
    signed = identity_pb2.SignedGenesis.FromString((coordinator / "genesis.pb").read_bytes())
    genesis = verify_genesis(signed)
    assert [m.agency for m in genesis.members] == sorted(AGENCIES)
    assert {m.address for m in genesis.members} == {f"10.77.0.{i}:{7800 + 10 * (i - 1)}"
                                                    for i in range(1, 5)}
    # every founding agency's first identities are certified in genesis
    assert len(genesis.credentials) == 3 * len(AGENCIES)
    for agency, d in dirs.items():
        code, _, err = _run("agency", "configure", "--agency-dir", str(d),
                            "--genesis", str(coordinator / "genesis.pb"))
        assert code == 0, err
        config = load_node_config(d / "node.toml")
        assert config.agency == agency
        assert config.paths.genesis == d / "genesis.pb"
        assert set(config.peers) == set(AGENCIES) - {agency}
        assert config.listen_grpc.startswith("127.0.0.1:")
        profile = load_profile(d / "profile.toml")
        assert profile.node == next(m.address for m in genesis.members if m.agency == agency)


def test_finalize_refuses_a_genesis_missing_a_member_signature(
        ceremony_dirs: tuple[Path, dict[str, Path]]) -> None:
    coordinator, dirs = ceremony_dirs
    draft = _draft(coordinator)
    sigs = _sign_all(coordinator, dirs, draft)
    code, _, err = _run("genesis", "finalize", str(draft), *map(str, sigs[:3]),
                        "--out", str(coordinator / "genesis.pb"))
    assert code != 0
    assert "lacks the signature of pboc" in err
    assert not (coordinator / "genesis.pb").exists()


def test_an_agency_refuses_to_sign_a_draft_naming_it_with_other_keys(
        ceremony_dirs: tuple[Path, dict[str, Path]]) -> None:
    coordinator, dirs = ceremony_dirs
    draft = ceremony.read_draft(_draft(coordinator))
    genesis = parse_genesis(draft)
    # a dishonest coordinator swaps police's node key for one it holds
    police = next(m for m in genesis.members if m.agency == "police")
    police.node_public_key = SigningKey.generate().public_key
    forged = identity_pb2.SignedGenesis(genesis=build_genesis(
        genesis.chain_id, genesis.created_at_ms, genesis.members, genesis.credentials,
        genesis.policies, genesis.params))
    with pytest.raises(InvalidSignature, match="another node key"):
        ceremony.sign_draft(forged, dirs["police"])
    # and a draft for another chain is refused too
    other = identity_pb2.SignedGenesis(genesis=build_genesis(
        "another-chain", genesis.created_at_ms, genesis.members, genesis.credentials,
        genesis.policies, genesis.params))
    with pytest.raises(MalformedInput, match="another-chain"):
        ceremony.sign_draft(other, dirs["tax"])


def test_forged_or_foreign_requests_are_refused(
        tmp_path: Path, ceremony_dirs: tuple[Path, dict[str, Path]]) -> None:
    coordinator, dirs = ceremony_dirs
    request = identity_pb2.MembershipRequest.FromString((coordinator / "tax.req").read_bytes())
    member = identity_pb2.Member.FromString(request.member)
    member.address = "10.66.6.6:7100"  # altered after the root signed it
    request.member = member.SerializeToString(deterministic=True)
    (coordinator / "tax.req").write_bytes(request.SerializeToString())
    code, _, err = _run("genesis", "propose", str(coordinator / "tax.req"),
                        "--out", str(coordinator / "draft.pb"))
    assert code != 0 and "tax.req" in err and "signature" in err
    assert not (coordinator / "draft.pb").exists()
    # a request made for another chain cannot be mixed in
    foreign = _init(tmp_path / "elsewhere", "market", 5, chain="another-chain")
    code, _, err = _run("genesis", "propose", str(coordinator / "police.req"),
                        str(foreign / "request.pb"), "--out", str(coordinator / "draft.pb"))
    assert code != 0 and "different chains" in err
    code, _, err = _run("genesis", "propose", str(dirs["police"] / "keys" / "node.key"),
                        "--out", str(coordinator / "draft.pb"))
    assert code != 0 and "node.key" in err


def test_configure_and_node_refuse_a_genesis_that_is_not_theirs(
        tmp_path: Path, ceremony_dirs: tuple[Path, dict[str, Path]]) -> None:
    coordinator, dirs = ceremony_dirs
    draft = _draft(coordinator)
    sigs = _sign_all(coordinator, dirs, draft)
    genesis_path = coordinator / "genesis.pb"
    assert _run("genesis", "finalize", str(draft), *map(str, sigs),
                "--out", str(genesis_path))[0] == 0
    # a second ceremony's tax (same name and chain, other keys) cannot use this genesis
    impostor = _init(tmp_path / "impostor", "tax", 0)
    code, _, err = _run("agency", "configure", "--agency-dir", str(impostor),
                        "--genesis", str(genesis_path))
    assert code != 0 and "another" in err
    assert not (impostor / "node.toml").exists()
    # a draft without signatures is not a genesis a node will configure or start on
    code, _, err = _run("agency", "configure", "--agency-dir", str(dirs["tax"]),
                        "--genesis", str(draft))
    assert code != 0 and "lacks the signature" in err

    from exchange.node.node import Node

    assert _run("agency", "configure", "--agency-dir", str(dirs["tax"]),
                "--genesis", str(genesis_path))[0] == 0
    config = load_node_config(dirs["tax"] / "node.toml")
    # the node refuses to start on a genesis lacking a member's signature...
    shutil.copy(draft, dirs["tax"] / "genesis.pb")
    with pytest.raises(InvalidSignature, match="lacks the signature"):
        Node(config)
    # ...or one naming this node with another key
    shutil.copy(genesis_path, dirs["tax"] / "genesis.pb")
    shutil.copy(AgencyPaths(impostor).node_key, AgencyPaths(dirs["tax"]).node_key)
    with pytest.raises(ExchangeError, match="another key"):
        Node(config)


def test_local_init_is_the_same_ceremony(tmp_path: Path) -> None:
    from exchange.identity.local_network import init_network

    net = init_network(tmp_path / "net", chain_id=CHAIN, now_ms=NOW_MS)
    signed = identity_pb2.SignedGenesis.FromString(net.genesis.read_bytes())
    genesis = verify_genesis(signed)
    for layout in net.agencies:
        request = ceremony.read_request(layout.dir / "request.pb", CHAIN)
        member, _ = ceremony.open_request(request)
        assert member in genesis.members
        ceremony.check_own_member(layout.dir, member)


def test_a_root_key_encrypted_at_init_signs_only_with_its_passphrase(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ROOT_PASS", "correct horse battery")
    out = tmp_path / "tax"
    code, _, err = _run("agency", "init", "--agency", "tax", "--host", "10.77.0.1",
                        "--chain-id", CHAIN, "--out", str(out),
                        "--root-passphrase-env", "ROOT_PASS")
    assert code == 0, err
    assert b"ENCRYPTED" in (out / "keys" / "root.key").read_bytes()
    shutil.copy(out / "request.pb", tmp_path / "tax.req")
    code, _, err = _run("genesis", "propose", str(tmp_path / "tax.req"),
                        "--out", str(tmp_path / "draft.pb"))
    assert code == 0, err
    sig = tmp_path / "tax.sig"
    code, _, err = _run("genesis", "sign", str(tmp_path / "draft.pb"), "--agency-dir",
                        str(out), "--out", str(sig))
    assert code != 0 and not sig.exists()
    code, _, err = _run("genesis", "sign", str(tmp_path / "draft.pb"), "--agency-dir",
                        str(out), "--out", str(sig), "--root-passphrase-env", "ROOT_PASS")
    assert code == 0, err
    code, _, err = _run("genesis", "finalize", str(tmp_path / "draft.pb"), str(sig),
                        "--out", str(tmp_path / "genesis.pb"))
    assert code == 0, err
    # configuring needs no root key: its public half is in the agency's own request
    code, _, err = _run("agency", "configure", "--agency-dir", str(out),
                        "--genesis", str(tmp_path / "genesis.pb"))
    assert code == 0, err
