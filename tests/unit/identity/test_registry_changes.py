"""The ledger's rules for membership changes and key rotations (KeyRegistry), as every
node, `chain verify` and an offline verifier apply them."""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from pathlib import Path

import pytest

from exchange.errors import (
    CredentialInvalid,
    InvalidSignature,
    MalformedInput,
    UnknownSigner,
)
from exchange.identity import ceremony, tls
from exchange.identity.keys import DataKey, Domain, SigningKey
from exchange.identity.network import AgencyMaterial
from exchange.identity.peer_auth import PeerAuthenticator, member_cas_from
from exchange.identity.registry import (
    NODE_KEY_GRACE_BLOCKS,
    KeyInfo,
    KeyRegistry,
    membership_change_statement,
)
from exchange.v1 import identity_pb2, ledger_pb2

CHAIN = "registry-changes"
NOW_MS = 1_790_000_000_000
FOUNDERS = ("tax", "police", "customs", "pboc")


@dataclass
class Net:
    registry: KeyRegistry
    materials: dict[str, AgencyMaterial]
    joiner: AgencyMaterial
    joiner_request: identity_pb2.MembershipRequest


@pytest.fixture()
def net(tmp_path: Path) -> Net:
    materials, requests = {}, []
    for i, agency in enumerate(FOUNDERS):
        material, request = ceremony.agency_init(tmp_path / agency, agency, f"10.1.0.{i + 1}",
                                                 CHAIN, now_ms=NOW_MS)
        materials[agency] = material
        requests.append(request)
    draft = ceremony.propose_genesis(requests, NOW_MS)
    signed = ceremony.finalize_genesis(
        draft, [ceremony.sign_draft(draft, tmp_path / a) for a in FOUNDERS])
    joiner, request = ceremony.agency_init(tmp_path / "market", "market", "10.1.0.9", CHAIN,
                                           now_ms=NOW_MS)
    return Net(KeyRegistry(signed), materials, joiner, request)


def _root(net: Net, agency: str) -> KeyInfo:
    return net.registry.resolve(net.materials[agency].root.key_id)


def _approve(net: Net, change: ledger_pb2.MembershipChange, *agencies: str,
             materials: dict[str, AgencyMaterial] | None = None) -> None:
    statement = membership_change_statement(change)
    for agency in agencies:
        root = (materials or net.materials)[agency].root
        change.approvals.append(ledger_pb2.MemberSignature(
            agency=agency, key_id=root.key_id,
            signature=root.sign(Domain.MEMBERSHIP_CHANGE, CHAIN, statement)))


def _add_change(net: Net) -> ledger_pb2.MembershipChange:
    return ledger_pb2.MembershipChange(
        member=net.joiner_request.member, request_signature=net.joiner_request.signature,
        members_before=sorted(net.registry.members),
        credentials=[c.SerializeToString() for c in net.joiner_request.credentials])


def _apply(net: Net, change: ledger_pb2.MembershipChange, height: int,
           by: str = "tax") -> None:
    body = ledger_pb2.TxBody()
    body.membership_change.CopyFrom(change)
    net.registry.apply(body, _root(net, by), height)


def test_a_quorum_of_roots_adds_a_member_with_its_credentials(net: Net) -> None:
    change = _add_change(net)
    _approve(net, change, "tax", "police", "customs")
    _apply(net, change, height=10)
    assert sorted(net.registry.members) == ["customs", "market", "pboc", "police", "tax"]
    assert net.registry.quorum == 4  # 4 of 5 from now on
    node = net.joiner.node_key.key_id
    with pytest.raises(CredentialInvalid, match="before height 11"):
        net.registry.node_key_at("market", node, 10)
    assert net.registry.node_key_at("market", node, 11).agency == "market"
    analysts = [k for k in net.registry.credentials() if k.agency == "market"]
    assert {k.subject for k in analysts} == {"analyst-1", "supervisor-1", "automation"}


@pytest.mark.parametrize("approvers", [("tax", "police"), ("tax", "tax", "police")])
def test_too_few_distinct_approvals_change_nothing(net: Net,
                                                   approvers: tuple[str, ...]) -> None:
    change = _add_change(net)
    _approve(net, change, *approvers)
    version = net.registry.version
    with pytest.raises(CredentialInvalid, match="3 are needed"):
        _apply(net, change, height=10)
    assert "market" not in net.registry.members and net.registry.version == version


def test_approvals_are_bound_to_the_member_set_and_the_exact_entry(net: Net) -> None:
    change = _add_change(net)
    _approve(net, change, "tax", "police", "customs")
    stale = ledger_pb2.MembershipChange()
    stale.CopyFrom(change)
    stale.members_before[:] = ["police", "tax"]
    with pytest.raises(CredentialInvalid, match="approved for members"):
        _apply(net, stale, height=10)
    # a member entry altered after approval (another address) fails the approvals
    member = identity_pb2.Member.FromString(change.member)
    member.address = "10.66.6.6:7100"
    altered = ledger_pb2.MembershipChange()
    altered.CopyFrom(change)
    altered.member = member.SerializeToString()
    with pytest.raises(InvalidSignature):
        _apply(net, altered, height=10)
    # an entry the joining agency's root did not sign is refused even with approvals
    forged = ledger_pb2.MembershipChange()
    forged.CopyFrom(change)
    forged.request_signature = SigningKey.generate().sign(Domain.MEMBERSHIP_REQUEST, CHAIN,
                                                          change.member)
    del forged.approvals[:]
    _approve(net, forged, "tax", "police", "customs")
    with pytest.raises(InvalidSignature):
        _apply(net, forged, height=10)
    assert "market" not in net.registry.members
    # an analyst may not submit it, approvals or not
    analyst = next(k for k in net.registry.credentials() if k.agency == "tax")
    body = ledger_pb2.TxBody()
    body.membership_change.CopyFrom(change)
    with pytest.raises(CredentialInvalid, match="root or node"):
        net.registry.apply(body, analyst, 10)


def test_a_removed_member_signs_nothing_later(net: Net) -> None:
    change = _add_change(net)
    _approve(net, change, "tax", "police", "customs")
    _apply(net, change, height=10)
    removal = ledger_pb2.MembershipChange(remove_agency="market",
                                          members_before=sorted(net.registry.members))
    _approve(net, removal, "tax", "police", "customs")
    with pytest.raises(CredentialInvalid, match="4 are needed"):
        _apply(net, removal, height=20)
    del removal.approvals[:]
    _approve(net, removal, "tax", "police", "customs", "pboc")
    _apply(net, removal, height=20)
    assert "market" not in net.registry.members and net.registry.quorum == 3
    analyst = next(k for k in net.registry.credentials() if k.agency == "market")
    net.registry.check_signer(analyst.key_id, 20, NOW_MS)
    with pytest.raises(CredentialInvalid, match="revoked at height 20"):
        net.registry.check_signer(analyst.key_id, 21, NOW_MS)
    node = net.joiner.node_key.key_id
    assert net.registry.node_key_at("market", node, 20)
    with pytest.raises(CredentialInvalid):
        net.registry.node_key_at("market", node, 21)
    # the name is not reused
    again = _add_change(net)
    _approve(net, again, "tax", "police", "customs")
    with pytest.raises(MalformedInput, match="not reused"):
        _apply(net, again, height=30)


def _rotate(net: Net, agency: str, rotation: ledger_pb2.KeyRotation, height: int,
            signer: KeyInfo | None = None) -> None:
    body = ledger_pb2.TxBody()
    body.key_rotation.CopyFrom(rotation)
    net.registry.apply(body, signer or _root(net, agency), height)


def test_node_key_rotation_keeps_the_old_key_for_a_grace_period(net: Net) -> None:
    old = net.materials["police"].node_key.key_id
    new = SigningKey.generate()
    rotation = ledger_pb2.KeyRotation(key_kind="node", new_public_key=new.public_key)
    with pytest.raises(CredentialInvalid, match="by its root"):
        _rotate(net, "police", rotation, 50, signer=net.registry.resolve(old))
    _rotate(net, "police", rotation, 50)
    assert net.registry.node_key("police").key_id == new.key_id
    assert net.registry.node_key_at("police", old, 50 + NODE_KEY_GRACE_BLOCKS)
    with pytest.raises(CredentialInvalid):
        net.registry.node_key_at("police", old, 51 + NODE_KEY_GRACE_BLOCKS)
    with pytest.raises(CredentialInvalid):
        net.registry.node_key_at("police", new.key_id, 50)
    assert net.registry.node_key_at("police", new.key_id, 51)
    # another agency's node key is never accepted for police
    with pytest.raises(UnknownSigner) as refused:
        net.registry.node_key_at("police", net.materials["tax"].node_key.key_id, 51)
    assert refused.value.code == "UNKNOWN_SIGNER"


def test_certificate_rotation_revokes_every_other_node_certificate(net: Net) -> None:
    customs = net.materials["customs"]
    now = datetime.datetime.now(datetime.UTC)
    fresh = tls.issue_node_certificate(customs.tls_ca, "customs", ["10.1.0.3"], now)
    foreign = tls.issue_node_certificate(net.materials["tax"].tls_ca, "customs", [], now)
    with pytest.raises(InvalidSignature, match="not issued by customs's CA"):
        _rotate(net, "customs", ledger_pb2.KeyRotation(
            key_kind="tls", new_certificate=foreign.cert_der), 60)
    with pytest.raises(MalformedInput, match="cannot be rotated"):
        _rotate(net, "customs", ledger_pb2.KeyRotation(key_kind="ssh"), 60)
    before = PeerAuthenticator(member_cas_from(net.registry.members.values()),
                               net.registry.node_certs)
    assert before.identify(customs.node_tls.cert_pem).agency == "customs"
    _rotate(net, "customs", ledger_pb2.KeyRotation(key_kind="tls",
                                                   new_certificate=fresh.cert_der), 60)
    after = PeerAuthenticator(member_cas_from(net.registry.members.values()),
                              net.registry.node_certs)
    assert after.identify(fresh.cert_pem).is_node
    with pytest.raises(CredentialInvalid, match="revoked"):
        after.identify(customs.node_tls.cert_pem)
    # the agency's analysts' certificates are not node certificates: unaffected
    analyst = tls.issue_client_certificate(customs.tls_ca, "customs", "analyst-1", now)
    assert after.identify(analyst.cert_pem).subject == "analyst-1"


def test_statement_names_operation_members_and_subject() -> None:
    add = ledger_pb2.MembershipChange(member=b"entry", members_before=["a", "b"])
    remove = ledger_pb2.MembershipChange(remove_agency="b", members_before=["a", "b"])
    assert membership_change_statement(add) == b"add\0a\nb\0entry"
    assert membership_change_statement(remove) == b"remove\0a\nb\0b"


def test_data_key_rotation_keeps_the_old_key_known_and_seals_to_the_new(net: Net) -> None:
    registry = net.registry
    old = net.materials["pboc"].data_key
    new = DataKey.generate()
    with pytest.raises(MalformedInput, match="32 bytes"):
        _rotate(net, "pboc", ledger_pb2.KeyRotation(key_kind="data"), 70)
    with pytest.raises(MalformedInput, match="only a data key rotation"):
        _rotate(net, "pboc", ledger_pb2.KeyRotation(
            key_kind="node", new_public_key=SigningKey.generate().public_key,
            compromised=True), 70)
    # another agency's data key is never taken over
    with pytest.raises(MalformedInput, match="never reused"):
        _rotate(net, "pboc", ledger_pb2.KeyRotation(
            key_kind="data", new_public_key=net.materials["tax"].data_key.public_key), 70)
    assert registry.data_key_id("pboc") == old.key_id
    _rotate(net, "pboc", ledger_pb2.KeyRotation(key_kind="data",
                                                new_public_key=new.public_key), 70)
    assert registry.data_key_id("pboc") == new.key_id
    assert registry.sealing_keys(["tax", "pboc"]) == [
        net.materials["tax"].data_key.public_key, new.public_key]
    # the old key stays the agency's, readable, and may still be sealed to (in flight)
    assert registry.agency_data_key_ids("pboc") == {old.key_id, new.key_id}
    assert registry.data_keys[old.key_id].retired_at_height == 70
    assert registry.data_keys[new.key_id].valid_from_height == 71
    registry.check_recipients([old.key_id, new.key_id], "an answer")
    # a key used once is never taken again, even the agency's own old one
    with pytest.raises(MalformedInput, match="never reused"):
        _rotate(net, "pboc", ledger_pb2.KeyRotation(key_kind="data",
                                                    new_public_key=old.public_key), 71)


def test_a_compromised_data_key_is_never_sealed_to_again(net: Net) -> None:
    registry = net.registry
    old = net.materials["police"].data_key
    new = DataKey.generate()
    _rotate(net, "police", ledger_pb2.KeyRotation(
        key_kind="data", new_public_key=new.public_key, compromised=True), 80)
    assert registry.compromised(old.key_id) and not registry.compromised(new.key_id)
    assert registry.agency_data_key_ids("police") == {new.key_id}
    assert registry.sealing_keys(["police"]) == [new.public_key]
    with pytest.raises(CredentialInvalid, match="compromised at height 80"):
        registry.check_recipients([net.materials["tax"].data_key.key_id, old.key_id],
                                  "the answer")


def test_a_credential_binds_its_holders_tls_client_key_for_reads(net: Net) -> None:
    from exchange.identity.genesis import issue_credential

    tax = net.materials["tax"]
    cert = tls.issue_client_certificate(tax.tls_ca, "tax", "analyst-5")
    other = tls.issue_client_certificate(tax.tls_ca, "tax", "analyst-6")
    key = SigningKey.generate()
    digest = tls.public_key_sha256(cert.certificate)
    signed = issue_credential(net.registry.chain_id, "tax", "analyst-5", key.public_key,
                              ["analyst"], 1_000, 2_000, tax.root, tls_key_sha256=digest)
    body = ledger_pb2.TxBody()
    body.credential_issue.signed_credential = signed.SerializeToString(deterministic=True)
    net.registry.apply(body, _root(net, "tax"), 90)
    assert net.registry.check_reader(digest, "tax", "analyst-5", 90, 1_500).key_id == \
        key.key_id
    with pytest.raises(CredentialInvalid, match="not at 2001"):
        net.registry.check_reader(digest, "tax", "analyst-5", 90, 2_001)
    with pytest.raises(CredentialInvalid, match="bound to the credential of tax/analyst-5"):
        net.registry.check_reader(digest, "tax", "analyst-6", 90, 1_500)
    with pytest.raises(CredentialInvalid, match="no credential on the ledger binds"):
        net.registry.check_reader(tls.public_key_sha256(other.certificate), "tax",
                                  "analyst-6", 90, 1_500)
    net.registry.revoke(key.key_id, "tax", 95)
    with pytest.raises(CredentialInvalid, match="revoked at height 95"):
        net.registry.check_reader(digest, "tax", "analyst-5", 95, 1_500)


def test_a_credential_binding_no_tls_key_is_matched_by_its_subject_while_latest(
        net: Net) -> None:
    """Credentials issued before the binding (none names a TLS key) keep their holders
    reading, by the certificate's name, until revoked or replaced by a bound one."""
    from exchange.identity.genesis import issue_credential

    tax = net.materials["tax"]
    cert = tls.issue_client_certificate(tax.tls_ca, "tax", "analyst-8")
    digest = tls.public_key_sha256(cert.certificate)
    legacy = SigningKey.generate()

    def issue(key: SigningKey, tls_key: bytes, height: int) -> None:
        signed = issue_credential(net.registry.chain_id, "tax", "analyst-8", key.public_key,
                                  ["analyst"], 1_000, 2_000, tax.root, tls_key_sha256=tls_key)
        body = ledger_pb2.TxBody()
        body.credential_issue.signed_credential = signed.SerializeToString(
            deterministic=True)
        net.registry.apply(body, _root(net, "tax"), height)

    issue(legacy, b"", 100)
    assert net.registry.check_reader(digest, "tax", "analyst-8", 100, 1_500).key_id == \
        legacy.key_id
    with pytest.raises(CredentialInvalid, match="no credential on the ledger binds"):
        net.registry.check_reader(digest, "tax", "analyst-9", 100, 1_500)
    net.registry.revoke(legacy.key_id, "tax", 101)
    with pytest.raises(CredentialInvalid, match="revoked at height 101"):
        net.registry.check_reader(digest, "tax", "analyst-8", 101, 1_500)
    # a bound credential for the subject: only the certificate it names reads
    bound = SigningKey.generate()
    other = tls.issue_client_certificate(tax.tls_ca, "tax", "analyst-8")
    issue(bound, tls.public_key_sha256(other.certificate), 102)
    assert net.registry.check_reader(tls.public_key_sha256(other.certificate), "tax",
                                     "analyst-8", 102, 1_500).key_id == bound.key_id
    with pytest.raises(CredentialInvalid, match="no credential on the ledger binds"):
        net.registry.check_reader(digest, "tax", "analyst-8", 102, 1_500)
