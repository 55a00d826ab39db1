"""`exchange init`: genesis, keys, TLS material and configs of a local network."""

from __future__ import annotations

import ipaddress
import json
import os
import stat
from collections.abc import Callable, Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from click.testing import CliRunner
from cryptography import x509
from cryptography.x509 import DNSName, IPAddress
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from exchange.cli.init_cmd import init
from exchange.cli.main import ExchangeGroup
from exchange.errors import AlreadyExists, MalformedInput
from exchange.identity import ceremony, tls
from exchange.identity.config import (
    load_node_config,
    load_profile,
    read_signed_genesis,
    write_node_config,
)
from exchange.identity.genesis import parse_credential, verify_genesis
from exchange.identity.keys import read_data_key, read_signing_key
from exchange.identity.local_network import init_network
from exchange.identity.network import (
    CREDENTIAL_VALIDITY_MS,
    DEFAULT_AGENCIES,
    AgencyPaths,
    NetworkLayout,
)
from exchange.identity.registry import KeyRegistry
from exchange.v1 import identity_pb2

NOW_MS = 1_790_000_000_000  # fixed for the credential checks; certificates use it too
SUBJECTS = {"analyst-1": ("analyst",), "supervisor-1": ("analyst", "supervisor"),
            "automation": ("automation",)}


@pytest.fixture(scope="module")
def net(tmp_path_factory: pytest.TempPathFactory) -> NetworkLayout:
    out = tmp_path_factory.mktemp("init") / "local"
    return init_network(out, chain_id="test-chain")


def _snapshot(root: Path) -> dict[str, tuple[bytes, int, int]]:
    """Every file under root: contents, mtime and mode."""
    snap = {}
    for path in sorted(root.rglob("*")):
        st = path.stat()
        data = path.read_bytes() if path.is_file() else b""
        snap[str(path.relative_to(root))] = (data, st.st_mtime_ns, stat.S_IMODE(st.st_mode))
    return snap


def _genesis(layout: NetworkLayout) -> identity_pb2.Genesis:
    return verify_genesis(read_signed_genesis(layout.genesis))


# -- genesis and registry ----------------------------------------------------------------

def test_init_writes_genesis_that_every_member_signed(net: NetworkLayout) -> None:
    signed = read_signed_genesis(net.genesis)
    genesis = verify_genesis(signed)
    assert genesis.chain_id == "test-chain"
    assert [m.agency for m in genesis.members] == list(DEFAULT_AGENCIES)
    assert sorted(s.agency for s in signed.signatures) == sorted(DEFAULT_AGENCIES)
    assert (net.out_dir / "genesis.json").read_text().startswith("{")


def test_registry_from_genesis_resolves_node_root_and_credential_keys(
        net: NetworkLayout) -> None:
    registry = KeyRegistry(read_signed_genesis(net.genesis))
    for agency in DEFAULT_AGENCIES:
        paths = AgencyPaths(net.out_dir / agency)
        node = read_signing_key(paths.node_key)
        root = read_signing_key(paths.root_key)
        assert registry.node_key(agency).key_id == node.key_id
        assert registry.resolve(root.key_id).subject == "root"
        assert registry.members[agency].data_public_key == read_data_key(
            paths.data_key).public_key
        for subject, roles in SUBJECTS.items():
            key = read_signing_key(paths.signing_key(subject))
            info = registry.resolve(key.key_id)
            assert (info.agency, info.subject) == (agency, subject)
            assert set(info.roles) == set(roles)
            signed = identity_pb2.SignedCredential.FromString(
                paths.credential(subject).read_bytes())
            assert signed.SerializeToString(deterministic=True) == info.credential


def test_credentials_are_valid_for_one_year_from_genesis(tmp_path: Path) -> None:
    layout = init_network(tmp_path / "n", agencies=["tax", "police"], now_ms=NOW_MS)
    genesis = _genesis(layout)
    assert genesis.created_at_ms == NOW_MS
    assert len(genesis.credentials) == 2 * len(SUBJECTS)
    for signed in genesis.credentials:
        cred = parse_credential(signed)
        assert cred.not_before_ms == NOW_MS
        assert cred.not_after_ms - cred.not_before_ms == CREDENTIAL_VALIDITY_MS
    registry = KeyRegistry(read_signed_genesis(layout.genesis))
    key = read_signing_key(AgencyPaths(layout.out_dir / "tax").signing_key("analyst-1"))
    registry.check_signer(key.key_id, height=1, time_ms=NOW_MS + 1)


def test_default_chain_id_is_prefixed_random_hex(tmp_path: Path) -> None:
    a = init_network(tmp_path / "a", agencies=["tax"])
    b = init_network(tmp_path / "b", agencies=["tax"])
    assert a.chain_id.startswith("shenzhen-exchange-")
    assert a.chain_id != b.chain_id


# -- files ------------------------------------------------------------------------------

def test_private_keys_are_0600_and_folders_0700(net: NetworkLayout) -> None:
    keys = [p for p in net.out_dir.rglob("*.key")]
    assert len(keys) == len(DEFAULT_AGENCIES) * (5 + 2 * len(SUBJECTS))
    for path in keys:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    dirs = [net.out_dir, *(p for p in net.out_dir.rglob("*") if p.is_dir())]
    for path in dirs:
        assert stat.S_IMODE(path.stat().st_mode) == 0o700, path


def test_layout_has_every_file_the_nodes_start_from(net: NetworkLayout) -> None:
    for a in net.agencies:
        paths = AgencyPaths(a.dir)
        for path in (paths.root_key, paths.node_key, paths.data_key, paths.ca_cert,
                     paths.ca_key, paths.node_cert, paths.node_tls_key, paths.node_config,
                     paths.profile):
            assert path.is_file(), path
        for subject in SUBJECTS:
            for path in (paths.signing_key(subject), paths.credential(subject),
                         paths.client_cert(subject), paths.client_key(subject),
                         paths.subject_profile(subject)):
                assert path.is_file(), path
        assert paths.data_dir.is_dir() and not any(paths.data_dir.iterdir())
    assert not [p for p in net.out_dir.parent.iterdir() if p.name.startswith(".")]


def test_second_init_refuses_and_changes_nothing(tmp_path: Path) -> None:
    out = tmp_path / "net"
    init_network(out, agencies=["tax", "police"])
    before = _snapshot(out)
    with pytest.raises(AlreadyExists, match=str(out)):
        init_network(out, agencies=["tax", "police"])
    assert _snapshot(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["net"]


def test_force_replaces_an_existing_network(tmp_path: Path) -> None:
    out = tmp_path / "net"
    first = init_network(out, agencies=["tax", "police"])
    old_root = (out / "tax" / "keys" / "root.key").read_bytes()
    second = init_network(out, agencies=["tax", "customs"], overwrite=True)
    assert second.chain_id != first.chain_id
    assert (out / "tax" / "keys" / "root.key").read_bytes() != old_root
    assert not (out / "police").exists()
    assert [m.agency for m in _genesis(second).members] == ["tax", "customs"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["net"]


def test_force_refuses_to_replace_a_folder_that_is_not_a_network(tmp_path: Path) -> None:
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(AlreadyExists, match="refusing"):
        init_network(out, overwrite=True)
    assert (out / "notes.txt").read_text() == "keep me"


def test_init_into_an_empty_folder_is_allowed(tmp_path: Path) -> None:
    out = tmp_path / "empty"
    out.mkdir()
    init_network(out, agencies=["tax"])
    assert (out / "genesis.pb").is_file()


def test_failed_init_leaves_nothing_behind(tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(*args: object, **kwargs: object) -> None:
        raise RuntimeError("disk full")

    monkeypatch.setattr(ceremony, "write_agency_configs", boom)
    with pytest.raises(RuntimeError):
        init_network(tmp_path / "net", agencies=["tax", "police"])
    assert list(tmp_path.iterdir()) == []


def test_custom_agencies_get_ports_in_steps_of_ten(tmp_path: Path) -> None:
    layout = init_network(tmp_path / "n", agencies=["tax", "audit-office", "bank2"],
                          base_port=9000)
    assert [(a.agency, a.grpc_address, a.metrics_address) for a in layout.agencies] == [
        ("tax", "127.0.0.1:9000", "127.0.0.1:9001"),
        ("audit-office", "127.0.0.1:9010", "127.0.0.1:9011"),
        ("bank2", "127.0.0.1:9020", "127.0.0.1:9021"),
    ]
    genesis = _genesis(layout)
    assert [(m.agency, m.address) for m in genesis.members] == [
        ("tax", "127.0.0.1:9000"), ("audit-office", "127.0.0.1:9010"),
        ("bank2", "127.0.0.1:9020")]
    assert genesis.members[1].display_name == "audit-office"


@pytest.mark.parametrize("agencies", [
    [], ["Tax"], ["t"], ["tax", "tax"], ["1tax"], ["tax/x"], ["a" * 32], [""]])
def test_invalid_agency_lists_are_refused_before_writing(tmp_path: Path,
                                                         agencies: list[str]) -> None:
    with pytest.raises(MalformedInput):
        init_network(tmp_path / "n", agencies=agencies)
    assert list(tmp_path.iterdir()) == []


def test_ports_beyond_65535_are_refused(tmp_path: Path) -> None:
    with pytest.raises(MalformedInput, match="ports"):
        init_network(tmp_path / "n", base_port=65530)


# -- TLS --------------------------------------------------------------------------------

def _store_of(agency_dir: Path) -> Store:
    return Store([x509.load_pem_x509_certificate(AgencyPaths(agency_dir).ca_cert.read_bytes())])


def test_node_certificate_chains_to_its_own_agency_ca_only(net: NetworkLayout) -> None:
    tax, police = net.out_dir / "tax", net.out_dir / "police"
    node_cert = x509.load_pem_x509_certificate(AgencyPaths(tax).node_cert.read_bytes())
    for name in (DNSName("tax.exchange.local"), DNSName("localhost"),
                 IPAddress(ipaddress.ip_address("127.0.0.1"))):
        verifier = PolicyBuilder().store(_store_of(tax)).build_server_verifier(name)
        chain = verifier.verify(node_cert, [])
        assert chain[-1].subject.rfc4514_string() == "CN=tax exchange CA,OU=exchange,O=tax"
    with pytest.raises(VerificationError):
        PolicyBuilder().store(_store_of(police)).build_server_verifier(
            DNSName("tax.exchange.local")).verify(node_cert, [])
    with pytest.raises(VerificationError):
        PolicyBuilder().store(_store_of(tax)).build_server_verifier(
            DNSName("police.exchange.local")).verify(node_cert, [])


def test_analyst_client_certificate_names_agency_and_subject(net: NetworkLayout) -> None:
    paths = AgencyPaths(net.out_dir / "customs")
    cert = x509.load_pem_x509_certificate(paths.client_cert("analyst-1").read_bytes())
    assert tls.common_name(cert) == "customs/analyst-1"
    PolicyBuilder().store(_store_of(paths.dir)).build_client_verifier().verify(cert, [])
    with pytest.raises(VerificationError):
        PolicyBuilder().store(_store_of(net.out_dir / "tax")).build_client_verifier().verify(
            cert, [])
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH]


def test_trust_bundle_holds_exactly_the_member_cas(net: NetworkLayout) -> None:
    bundle = tls.trust_bundle(_genesis(net))
    certs = x509.load_pem_x509_certificates(bundle)
    expected = [x509.load_pem_x509_certificate(AgencyPaths(a.dir).ca_cert.read_bytes())
                for a in net.agencies]
    assert certs == expected


@pytest.fixture
def health_server(net: NetworkLayout) -> Iterator[int]:
    """The tax node's TLS identity serving grpc health, trusting genesis's CAs only."""
    paths = AgencyPaths(net.out_dir / "tax")
    creds = grpc.ssl_server_credentials(
        [(paths.node_tls_key.read_bytes(), paths.node_cert.read_bytes())],
        root_certificates=tls.trust_bundle(_genesis(net)), require_client_auth=True)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    health_pb2_grpc.add_HealthServicer_to_server(health.HealthServicer(), server)
    port = server.add_secure_port("127.0.0.1:0", creds)
    server.start()
    try:
        yield port
    finally:
        server.stop(grace=None)


def _check(port: int, bundle: bytes, key: bytes, cert: bytes,
           server_name: str | None = None) -> health_pb2.HealthCheckResponse:
    options = [("grpc.ssl_target_name_override", server_name)] if server_name else []
    creds = grpc.ssl_channel_credentials(root_certificates=bundle, private_key=key,
                                         certificate_chain=cert)
    with grpc.secure_channel(f"127.0.0.1:{port}", creds, options=options) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        response: health_pb2.HealthCheckResponse = stub.Check(
            health_pb2.HealthCheckRequest(), timeout=10)
        return response


def test_mutual_tls_between_two_generated_nodes_works(net: NetworkLayout,
                                                      health_server: int) -> None:
    police = AgencyPaths(net.out_dir / "police")
    bundle = tls.trust_bundle(_genesis(net))
    serving = health_pb2.HealthCheckResponse.SERVING
    # By IP (the SAN 127.0.0.1) and by the agency's name.
    assert _check(health_server, bundle, police.node_tls_key.read_bytes(),
                  police.node_cert.read_bytes()).status == serving
    assert _check(health_server, bundle, police.node_tls_key.read_bytes(),
                  police.node_cert.read_bytes(), "tax.exchange.local").status == serving


def test_analyst_client_certificate_is_accepted_by_its_node(net: NetworkLayout,
                                                            health_server: int) -> None:
    profile = load_profile(net.out_dir / "tax" / "profile.toml")
    response = _check(health_server, profile.ca_bundle.read_bytes(),
                      profile.tls_key.read_bytes(), profile.tls_cert.read_bytes())
    assert response.status == health_pb2.HealthCheckResponse.SERVING


def test_client_with_certificate_from_a_ca_outside_genesis_is_refused(
        net: NetworkLayout, health_server: int) -> None:
    rogue_ca = tls.create_ca("tax")  # same name as a member, different key
    rogue = tls.issue_node_certificate(rogue_ca, "tax")
    bundle = tls.trust_bundle(_genesis(net))
    with pytest.raises(grpc.RpcError) as info:
        _check(health_server, bundle, rogue.key_pem, rogue.cert_pem)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE


def test_client_refuses_a_server_whose_ca_it_does_not_trust(
        net: NetworkLayout, health_server: int) -> None:
    police = AgencyPaths(net.out_dir / "police")
    only_police_ca = police.ca_cert.read_bytes()
    with pytest.raises(grpc.RpcError):
        _check(health_server, only_police_ca, police.node_tls_key.read_bytes(),
               police.node_cert.read_bytes())


# -- configs ----------------------------------------------------------------------------

def test_node_config_loads_back_with_resolved_paths(net: NetworkLayout) -> None:
    tax = net.out_dir / "tax"
    config = load_node_config(tax / "node.toml")
    genesis = _genesis(net)
    config.check_against(genesis)
    assert config.agency == "tax" and config.node_id == "tax"
    assert config.listen_grpc == "127.0.0.1:7100"
    assert config.listen_metrics == "127.0.0.1:7101"
    assert config.peers == {"police": "127.0.0.1:7110", "customs": "127.0.0.1:7120",
                            "pboc": "127.0.0.1:7130"}
    assert config.paths.genesis == net.out_dir / "tax" / "genesis.pb"
    assert config.paths.genesis.read_bytes() == net.genesis.read_bytes()
    assert config.paths.data_dir == tax / "data"
    assert config.paths.trust_bundle is None
    assert config.read_trust_bundle() == tls.trust_bundle(genesis)
    node_key = read_signing_key(config.paths.node_key)
    assert node_key.public_key == genesis.members[0].node_public_key
    assert read_data_key(config.paths.data_key).public_key == genesis.members[0].data_public_key
    tls.read_identity(config.paths.tls_cert, config.paths.tls_key)
    assert config.block.tx_max == genesis.params.block_tx_max


def test_configs_still_load_after_the_network_folder_moves(tmp_path: Path) -> None:
    layout = init_network(tmp_path / "a", agencies=["tax"])
    os.rename(layout.out_dir, tmp_path / "b")
    config = load_node_config(tmp_path / "b" / "tax" / "node.toml")
    assert config.paths.genesis == tmp_path / "b" / "tax" / "genesis.pb"
    assert config.paths.genesis.is_file()


def test_profile_loads_back_with_resolved_paths(net: NetworkLayout) -> None:
    tax = net.out_dir / "tax"
    profile = load_profile(tax / "profile.toml")
    assert (profile.agency, profile.subject, profile.node) == ("tax", "analyst-1",
                                                               "127.0.0.1:7100")
    assert profile.signing_key == tax / "analysts" / "analyst-1.key"
    assert profile.ca_bundle == tax / "tls" / "ca.pem"
    assert profile.passphrase_env is None and profile.passphrase() is None
    registry = KeyRegistry(read_signed_genesis(net.genesis))
    key = read_signing_key(profile.signing_key)
    assert registry.resolve(key.key_id).subject == "analyst-1"
    supervisor = load_profile(tax / "analysts" / "supervisor-1.toml")
    assert supervisor.signing_key == tax / "analysts" / "supervisor-1.key"


def test_rewritten_node_config_round_trips(net: NetworkLayout, tmp_path: Path) -> None:
    config = load_node_config(net.out_dir / "tax" / "node.toml")
    copy = tmp_path / "elsewhere" / "node.toml"
    copy.parent.mkdir()
    write_node_config(copy, config)
    assert load_node_config(copy) == config
    with pytest.raises(AlreadyExists):
        write_node_config(copy, config)


@pytest.mark.parametrize(("edit", "message"), [
    (lambda t: t.replace('grpc = "127.0.0.1:7100"', 'grpc = "127.0.0.1:99999"'),
     "key 'listen.grpc'"),
    (lambda t: t.replace('agency = "tax"', 'agency = "TAX"'), "key 'agency'"),
    (lambda t: t.replace("tx_max = 2000", 'tx_max = "many"'), "key 'block.tx_max'"),
    (lambda t: t.replace('log_level = "info"', 'log_level = "loud"'), "key 'log_level'"),
    (lambda t: t.replace('data_dir = "data"\n', ""), "key 'paths.data_dir': missing"),
    (lambda t: "surprise = 1\n" + t, "key 'surprise': unknown key"),
    (lambda t: t + "\nsurprise = 1\n", "key 'data.surprise': unknown key"),
    (lambda t: t.replace('police = "127.0.0.1:7110"', 'tax = "127.0.0.1:7110"'),
     "key 'peers.tax'"),
    (lambda t: t.replace("[listen]", "[listen"), "node.toml"),
])
def test_bad_node_config_names_file_and_key(net: NetworkLayout, tmp_path: Path,
                                            edit: Callable[[str], str], message: str) -> None:
    text = (net.out_dir / "tax" / "node.toml").read_text()
    bad = tmp_path / "node.toml"
    bad.write_text(edit(text))
    with pytest.raises(MalformedInput) as info:
        load_node_config(bad)
    assert str(bad) in str(info.value)
    assert message in str(info.value)


def test_node_config_that_does_not_fit_genesis_is_refused(net: NetworkLayout,
                                                          tmp_path: Path) -> None:
    text = (net.out_dir / "tax" / "node.toml").read_text()
    bad = tmp_path / "node.toml"
    bad.write_text(text.replace('pboc = "127.0.0.1:7130"\n', ""))
    with pytest.raises(MalformedInput, match="peers"):
        load_node_config(bad).check_against(_genesis(net))


def test_profile_passphrase_comes_from_the_named_variable(
        net: NetworkLayout, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    text = (net.out_dir / "tax" / "profile.toml").read_text()
    path = tmp_path / "profile.toml"
    path.write_text(text + 'passphrase_env = "EXCHANGE_TEST_PASS"\n')
    profile = load_profile(path)
    monkeypatch.delenv("EXCHANGE_TEST_PASS", raising=False)
    with pytest.raises(MalformedInput, match="EXCHANGE_TEST_PASS"):
        profile.passphrase()
    monkeypatch.setenv("EXCHANGE_TEST_PASS", "s3cret")
    assert profile.passphrase() == b"s3cret"


# -- CLI --------------------------------------------------------------------------------

def _cli() -> ExchangeGroup:
    return ExchangeGroup(name="exchange", commands={"init": init})


def test_cli_init_writes_network_and_prints_summary(tmp_path: Path) -> None:
    out = tmp_path / "deploy" / "local"
    result = CliRunner().invoke(_cli(), [
        "init", "--out", str(out), "--agencies", "tax, police,customs",
        "--chain-id", "cli-chain", "--base-port", "8000"])
    assert result.exit_code == 0, result.output
    assert "cli-chain" in result.output
    assert "127.0.0.1:8020" in result.output
    genesis = verify_genesis(read_signed_genesis(out / "genesis.pb"))
    assert genesis.chain_id == "cli-chain"
    assert [m.agency for m in genesis.members] == ["tax", "police", "customs"]


def test_cli_init_json_summary(tmp_path: Path) -> None:
    result = CliRunner().invoke(_cli(), ["init", "--out", str(tmp_path / "n"), "--agencies",
                                         "tax,pboc", "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    assert [a["grpc"] for a in summary["agencies"]] == ["127.0.0.1:7100", "127.0.0.1:7110"]
    assert Path(summary["agencies"][1]["profile"]) == tmp_path / "n" / "pboc" / "profile.toml"


def test_cli_second_init_fails_with_one_line_unless_forced(tmp_path: Path) -> None:
    out = tmp_path / "net"
    runner = CliRunner()
    assert runner.invoke(_cli(), ["init", "--out", str(out), "--agencies", "tax"]).exit_code == 0
    before = _snapshot(out)
    result = runner.invoke(_cli(), ["init", "--out", str(out), "--agencies", "tax"])
    assert result.exit_code == 1
    assert result.output.strip().startswith("error:") and str(out) in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert _snapshot(out) == before
    forced = runner.invoke(_cli(), ["init", "--out", str(out), "--agencies", "tax", "--force"])
    assert forced.exit_code == 0, forced.output
    assert _snapshot(out) != before


def test_cli_rejects_bad_agency_list(tmp_path: Path) -> None:
    result = CliRunner().invoke(_cli(), ["init", "--out", str(tmp_path / "n"),
                                         "--agencies", "tax,Police"])
    assert result.exit_code == 1
    assert "Police" in result.output
    assert not (tmp_path / "n").exists()


def test_passphrase_env_encrypts_identity_keys_and_profiles_name_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from exchange.client import Signer, load_client_profile
    from exchange.errors import MalformedInput as Malformed
    from exchange.identity.config import load_profile
    from exchange.identity.keys import read_signing_key

    monkeypatch.setenv("EXCHANGE_TEST_PASSPHRASE", "correct horse battery")
    layout = init_network(tmp_path / "net", ("tax", "customs"),
                          passphrase_env="EXCHANGE_TEST_PASSPHRASE")
    profile = load_profile(layout.agencies[0].profile)
    assert profile.passphrase_env == "EXCHANGE_TEST_PASSPHRASE"
    pem = profile.signing_key.read_bytes()
    assert b"ENCRYPTED PRIVATE KEY" in pem
    with pytest.raises(Malformed):
        read_signing_key(profile.signing_key)  # no passphrase, no key
    key = read_signing_key(profile.signing_key, profile.passphrase())
    assert Signer.load(load_client_profile(layout.agencies[0].profile), layout.chain_id)
    assert key.public_key
    monkeypatch.setenv("EXCHANGE_TEST_PASSPHRASE", "short")
    with pytest.raises(Malformed, match="8 characters"):
        init_network(tmp_path / "other", passphrase_env="EXCHANGE_TEST_PASSPHRASE")


def test_a_metrics_port_on_the_raft_link_s_port_is_refused(net: NetworkLayout) -> None:
    text = (net.out_dir / "tax" / "node.toml").read_text()
    assert 'metrics = "127.0.0.1:7101"' in text
    # beside the original, so that its relative paths resolve the same way
    path = net.out_dir / "tax" / "node-raft-port.toml"
    path.write_text(text.replace('metrics = "127.0.0.1:7101"', 'metrics = "127.0.0.1:7102"'))
    try:
        with pytest.raises(MalformedInput, match=r"listen.grpc \+ 2 \(the Raft peer link's\)"):
            load_node_config(path)
    finally:
        path.unlink()
