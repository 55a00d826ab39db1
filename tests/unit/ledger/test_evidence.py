"""Evidence bundles: export, offline verification, and tampering of every byte."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from exchange.cli.main import _register, cli
from exchange.ledger.block import tx_id
from exchange.ledger.evidence import MAGIC, BundleInvalid, build_bundle, encode_bundle
from exchange.ledger.evidence_verify import decode_bundle, verify_bundle
from exchange.ledger.store import BlockStore
from exchange.v1 import evidence_pb2, ledger_pb2
from tests.support.ledger_net import Net, make_net, write_chain


@pytest.fixture(scope="module")
def chain(tmp_path_factory):  # type: ignore[no-untyped-def]
    net = make_net()
    path = tmp_path_factory.mktemp("ev") / "s.db"
    store = write_chain(net, path, blocks=6, txs_per_block=3, payload_size=24)
    return net, store, path


def _tx_at(store, height: int, index: int) -> bytes:  # type: ignore[no-untyped-def]
    return tx_id(ledger_pb2.Envelope.FromString(store.envelopes(height)[index]).body)


def test_bundle_verifies_offline_and_reports_each_transaction(chain) -> None:  # type: ignore[no-untyped-def]
    net, store, _ = chain
    ids = [_tx_at(store, 2, 0), _tx_at(store, 5, 2)]
    report = verify_bundle(encode_bundle(build_bundle(store, ids)))
    assert [t.tx_id for t in report.transactions] == [i.hex() for i in ids]
    assert report.transactions[1].height == 5 and report.transactions[1].index == 2
    assert report.transactions[0].attested_by == ["customs", "pboc", "police", "tax"]
    assert report.transactions[0].signer.endswith("/analyst-1")
    assert report.headers == 5 and report.quorum == 3


def test_flipping_any_byte_of_a_bundle_fails_and_names_where(chain) -> None:  # type: ignore[no-untyped-def]
    _, store, _ = chain
    data = encode_bundle(build_bundle(store, [_tx_at(store, 1, 1), _tx_at(store, 3, 0)]))
    places = set()
    for offset in range(len(data)):
        bad = bytearray(data)
        bad[offset] ^= 0x01
        with pytest.raises(BundleInvalid) as err:
            verify_bundle(bytes(bad))
        assert err.value.where
        places.add(err.value.where.split("[")[0])
    assert {"file", "genesis", "headers", "transactions"} <= places


def test_removed_header_is_detected(chain) -> None:  # type: ignore[no-untyped-def]
    _, store, _ = chain
    bundle = build_bundle(store, [_tx_at(store, 4, 0)])
    del bundle.headers[1]
    with pytest.raises(BundleInvalid, match="says height 3"):
        verify_bundle(encode_bundle(bundle))


def test_swapped_transaction_is_detected(chain) -> None:  # type: ignore[no-untyped-def]
    _, store, _ = chain
    bundle = build_bundle(store, [_tx_at(store, 4, 0)])
    bundle.transactions[0].envelope = store.envelopes(4)[1]  # a real, signed neighbour
    with pytest.raises(BundleInvalid, match="inclusion proof"):
        verify_bundle(encode_bundle(bundle))


def test_attestations_below_quorum_are_refused(chain) -> None:  # type: ignore[no-untyped-def]
    _, store, _ = chain
    bundle = build_bundle(store, [_tx_at(store, 2, 0)])
    del bundle.headers[1].attestations[1:]
    with pytest.raises(BundleInvalid, match="3 needed"):
        verify_bundle(encode_bundle(bundle))


def test_duplicate_attestation_does_not_count_twice(chain) -> None:  # type: ignore[no-untyped-def]
    _, store, _ = chain
    bundle = build_bundle(store, [_tx_at(store, 2, 0)])
    atts = list(bundle.headers[1].attestations)
    del bundle.headers[1].attestations[:]
    bundle.headers[1].attestations.extend([atts[0], atts[0], atts[1]])
    with pytest.raises(BundleInvalid, match="twice"):
        verify_bundle(encode_bundle(bundle))


def test_transaction_outside_bundled_headers_is_refused(chain) -> None:  # type: ignore[no-untyped-def]
    _, store, _ = chain
    bundle = build_bundle(store, [_tx_at(store, 5, 0)])
    del bundle.headers[4]
    with pytest.raises(BundleInvalid, match="outside the bundled headers"):
        verify_bundle(encode_bundle(bundle))


def test_reveal_is_checked_against_the_commitment(tmp_path: Path) -> None:
    net = make_net()
    import time

    from exchange.ledger.apply import LedgerApplier
    from exchange.ledger.block import attest, new_body, seal_envelope
    from exchange.ledger.store import BlockStore

    store = BlockStore.create(tmp_path / "s.db", net.signed_genesis)
    applier = LedgerApplier(store)
    salt, plaintext = os.urandom(32), b'{"rows":[]}'
    body = new_body(net.chain_id, "police", int(time.time() * 1000))
    body.answer_manifest.query_tx_id = b"\x01" * 32
    body.answer_manifest.chunk_count = 1
    body.answer_manifest.commitment = hashlib.sha256(salt + plaintext).digest()
    env = seal_envelope(body, net.nodes["police"])
    applied = applier.apply(applier.cut([env], int(time.time() * 1000), net.nodes["tax"], "tax"))
    store.add_attestations([attest(net.chain_id, a, 1, applied.checked.hash, applied.codes,
                                   net.nodes[a]) for a in net.nodes])
    tid = applied.checked.envelopes[0].tx_id
    good = evidence_pb2.Reveal(tx_id=tid, salt=salt, plaintext=plaintext)
    report = verify_bundle(encode_bundle(build_bundle(store, [tid], [good])))
    assert report.reveals == 1 and report.transactions[0].revealed
    bad = evidence_pb2.Reveal(tx_id=tid, salt=salt, plaintext=b'{"rows":[1]}')
    with pytest.raises(BundleInvalid, match="committed digest"):
        verify_bundle(encode_bundle(build_bundle(store, [tid], [bad])))


def test_non_canonical_or_foreign_bytes_are_refused(chain) -> None:  # type: ignore[no-untyped-def]
    _, store, _ = chain
    data = encode_bundle(build_bundle(store, [_tx_at(store, 1, 0)]))
    with pytest.raises(BundleInvalid, match="unknown field"):
        verify_bundle(data + b"\xf8\x07\x01")  # field 127, varint 1
    with pytest.raises(BundleInvalid, match="magic"):
        verify_bundle(b"PK\x03\x04" + data)
    assert decode_bundle(data).version == 1
    assert data.startswith(MAGIC)


def test_cli_exports_and_verifies_bundle_and_chain(chain, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    _, store, path = chain
    _register()
    runner = CliRunner()
    out = tmp_path / "case.evidence"
    tid = _tx_at(store, 3, 1).hex()
    res = runner.invoke(cli, ["evidence", "export", "--store", str(path), "--tx", tid,
                              "--out", str(out)])
    assert res.exit_code == 0, res.output
    res = runner.invoke(cli, ["evidence", "verify", str(out), "--json"])
    assert res.exit_code == 0, res.output
    assert '"ok": true' in res.output and tid in res.output
    data = bytearray(out.read_bytes())
    data[len(data) // 2] ^= 0x01
    out.write_bytes(bytes(data))
    res = runner.invoke(cli, ["evidence", "verify", str(out)])
    assert res.exit_code == 1 and "evidence invalid" in res.output
    res = runner.invoke(cli, ["chain", "verify", "--store", str(path), "--json"])
    assert res.exit_code == 0 and '"ok": true' in res.output


def test_bundle_carries_key_history_for_credentials_issued_on_chain(tmp_path: Path) -> None:
    import time

    from exchange.identity.genesis import issue_credential
    from exchange.identity.keys import CachedSigner, SigningKey
    from exchange.ledger.apply import LedgerApplier
    from exchange.ledger.block import attest, new_body, seal_envelope
    from exchange.ledger.store import BlockStore
    from tests.support.ledger_net import probe

    net = make_net()
    store = BlockStore.create(tmp_path / "s.db", net.signed_genesis)
    applier = LedgerApplier(store)
    now = int(time.time() * 1000)
    newcomer = CachedSigner(SigningKey.generate())
    cred = issue_credential(net.chain_id, "customs", "analyst-2", newcomer.public_key,
                            ["analyst"], now - 1000, now + 86_400_000, net.roots["customs"])
    issue = new_body(net.chain_id, "customs", now)
    issue.credential_issue.signed_credential = cred.SerializeToString(deterministic=True)
    revoke = new_body(net.chain_id, "customs", now)
    revoke.credential_revoke.key_id = newcomer.key_id
    blocks = [[seal_envelope(issue, net.nodes["customs"])],
              [probe(net, "customs", signer=newcomer)],
              [seal_envelope(revoke, net.supervisors["customs"])],
              [probe(net, "customs", signer=newcomer)]]
    for i, envs in enumerate(blocks):
        applied = applier.apply(applier.cut(envs, now + i, net.nodes["tax"], "tax"))
        store.add_attestations([attest(net.chain_id, a, i + 1, applied.checked.hash,
                                       applied.codes, net.nodes[a]) for a in net.nodes])
    used, after = (LedgerApplier(store).check(store.block(h), h, store.block_hash_at(h - 1),
                                              0).envelopes[0].tx_id for h in (2, 4))
    bundle = build_bundle(store, [used, after])
    assert len(bundle.key_history) == 2 and len(bundle.credentials) == 1
    report = verify_bundle(encode_bundle(bundle))
    assert [t.result for t in report.transactions] == ["OK", "SIGNER_NOT_VALID"]
    assert report.transactions[0].signer == "customs/analyst-2"
    # without the issuing transaction the newcomer's key is unknown
    del bundle.key_history[:]
    with pytest.raises(BundleInvalid, match="unknown signer"):
        verify_bundle(encode_bundle(bundle))


# -- no unchecked byte (issue 16, item 5) -----------------------------------------------
@dataclass
class KeyedChain:
    """A chain whose bundle needs key history: a credential issued on the ledger, used,
    revoked; an answer manifest to reveal; a transaction recorded AGENCY_MISMATCH."""

    net: Net
    store: BlockStore
    bundle: evidence_pb2.EvidenceBundle
    data: bytes
    salt: bytes


def _keyed_chain(path: Path) -> KeyedChain:
    import time

    from exchange.identity.genesis import issue_credential
    from exchange.identity.keys import CachedSigner, SigningKey
    from exchange.ledger.apply import LedgerApplier
    from exchange.ledger.block import attest, new_body, seal_envelope
    from exchange.ledger.store import BlockStore
    from tests.support.ledger_net import probe

    net = make_net()
    store = BlockStore.create(path, net.signed_genesis)
    applier = LedgerApplier(store)
    now = int(time.time() * 1000)
    newcomer = CachedSigner(SigningKey.generate())
    cred = issue_credential(net.chain_id, "customs", "analyst-2", newcomer.public_key,
                            ["analyst"], now - 1000, now + 86_400_000, net.roots["customs"])
    issue = new_body(net.chain_id, "customs", now)
    issue.credential_issue.signed_credential = cred.SerializeToString(deterministic=True)
    salt, plaintext = os.urandom(32), b'{"uscc":"91440300MA5F000001"}\n'
    manifest = new_body(net.chain_id, "police", now)
    manifest.answer_manifest.query_tx_id = b"\x01" * 32
    manifest.answer_manifest.chunk_count = 1
    manifest.answer_manifest.commitment = hashlib.sha256(salt + plaintext).digest()
    revoke = new_body(net.chain_id, "customs", now)
    revoke.credential_revoke.key_id = newcomer.key_id
    claims_police = new_body(net.chain_id, "police", now)
    claims_police.probe.payload = b"signed by tax, claims police"
    blocks = [[seal_envelope(issue, net.nodes["customs"])],
              [probe(net, "customs", signer=newcomer), probe(net, "tax")],
              [seal_envelope(manifest, net.nodes["police"])],
              [seal_envelope(revoke, net.supervisors["customs"])],
              [probe(net, "customs", signer=newcomer),
               seal_envelope(claims_police, net.analysts["tax"])]]
    for i, envs in enumerate(blocks):
        applied = applier.apply(applier.cut(envs, now + i, net.nodes["tax"], "tax"))
        store.add_attestations([attest(net.chain_id, a, i + 1, applied.checked.hash,
                                       applied.codes, net.nodes[a]) for a in net.nodes])
    ids = [_tx_at(store, 2, 0), _tx_at(store, 2, 1), _tx_at(store, 3, 0), _tx_at(store, 5, 0),
           _tx_at(store, 5, 1)]
    reveal = evidence_pb2.Reveal(tx_id=ids[2], salt=salt, plaintext=plaintext)
    bundle = build_bundle(store, ids, [reveal])
    return KeyedChain(net, store, bundle, encode_bundle(bundle), salt)


@pytest.fixture(scope="module")
def keyed(tmp_path_factory):  # type: ignore[no-untyped-def]
    return _keyed_chain(tmp_path_factory.mktemp("keyed") / "s.db")


def _copy(bundle: evidence_pb2.EvidenceBundle) -> evidence_pb2.EvidenceBundle:
    out = evidence_pb2.EvidenceBundle()
    out.CopyFrom(bundle)
    return out


def _refusal(bundle: evidence_pb2.EvidenceBundle | bytes) -> BundleInvalid:
    data = bundle if isinstance(bundle, bytes) else encode_bundle(bundle)
    with pytest.raises(BundleInvalid) as err:
        verify_bundle(data)
    return err.value


def test_keyed_bundle_verifies_and_reports_recorded_invalid_transactions(keyed) -> None:  # type: ignore[no-untyped-def]
    report = verify_bundle(keyed.data)
    assert [t.result for t in report.transactions] == [
        "OK", "OK", "NO_SUCH_QUERY", "SIGNER_NOT_VALID", "AGENCY_MISMATCH"]
    assert len(keyed.bundle.key_history) == 2 and report.reveals == 1
    # the transaction signed by tax's analyst that claims police is reported, not refused
    assert report.transactions[4].signer == "tax/analyst-1"


@pytest.mark.parametrize("height", [0, 6, 1 << 63])
def test_key_history_entry_outside_the_headers_is_refused_naming_it(keyed, height: int) -> None:  # type: ignore[no-untyped-def]
    bundle = _copy(keyed.bundle)
    bundle.key_history.append(evidence_pb2.BundledTransaction(
        envelope=os.urandom(64 * 1024), height=height, index=0, result_code="OK"))
    err = _refusal(bundle)
    assert err.where == "key_history[2]" and "outside the bundled headers" in str(err)


def test_forged_unsigned_rotation_in_key_history_is_refused(keyed) -> None:  # type: ignore[no-untyped-def]
    net = keyed.net
    body = ledger_pb2.TxBody(chain_id=net.chain_id, agency="customs", created_at_ms=1,
                             nonce=bytes(16))
    body.key_rotation.key_kind = "node"
    body.key_rotation.new_public_key = os.urandom(32)
    forged = ledger_pb2.Envelope(body=body.SerializeToString(deterministic=True),
                                 signer_key_id=net.roots["customs"].key_id,
                                 signature=bytes(64)).SerializeToString(deterministic=True)
    for height in (3, 6, 1 << 63):
        bundle = _copy(keyed.bundle)
        bundle.key_history.append(evidence_pb2.BundledTransaction(
            envelope=forged, height=height, index=0, result_code="OK"))
        err = _refusal(bundle)
        assert err.where == "key_history[2]", err


def test_key_history_entry_that_is_not_a_key_change_is_refused(keyed) -> None:  # type: ignore[no-untyped-def]
    bundle = _copy(keyed.bundle)
    bundle.key_history.insert(1, bundle.transactions[0])  # a probe, at its true place
    err = _refusal(bundle)
    assert err.where == "key_history[1]" and "not a key change" in str(err)


def test_key_history_duplicates_and_disorder_are_refused(keyed) -> None:  # type: ignore[no-untyped-def]
    bundle = _copy(keyed.bundle)
    bundle.key_history.append(bundle.key_history[1])  # the revocation twice
    err = _refusal(bundle)
    assert err.where == "key_history[2]" and "same transaction" in str(err)
    bundle = _copy(keyed.bundle)
    first, second = (evidence_pb2.BundledTransaction(), evidence_pb2.BundledTransaction())
    first.CopyFrom(bundle.key_history[0])
    second.CopyFrom(bundle.key_history[1])
    bundle.key_history[0].CopyFrom(second)
    bundle.key_history[1].CopyFrom(first)
    err = _refusal(bundle)
    assert err.where == "key_history[1]" and "out of chain order" in str(err)


def test_key_history_left_out_is_refused(keyed) -> None:  # type: ignore[no-untyped-def]
    """Without the revocation, the quorum's SIGNER_NOT_VALID contradicts the history."""
    bundle = _copy(keyed.bundle)
    del bundle.key_history[1]
    err = _refusal(bundle)
    assert err.where == "transactions[3]" and "key history is incomplete" in str(err)


def test_transaction_duplicates_and_disorder_are_refused(keyed) -> None:  # type: ignore[no-untyped-def]
    bundle = _copy(keyed.bundle)
    bundle.transactions.append(bundle.transactions[4])
    assert _refusal(bundle).where == "transactions[5]"
    bundle = _copy(keyed.bundle)
    moved = evidence_pb2.BundledTransaction()
    moved.CopyFrom(bundle.transactions[0])
    del bundle.transactions[0]
    bundle.transactions.append(moved)
    err = _refusal(bundle)
    assert err.where == "transactions[4]" and "out of chain order" in str(err)


def test_reveal_and_credential_duplicates_are_refused(keyed) -> None:  # type: ignore[no-untyped-def]
    bundle = _copy(keyed.bundle)
    bundle.reveals.append(bundle.reveals[0])
    assert _refusal(bundle).where == "reveals[1]"
    bundle = _copy(keyed.bundle)
    bundle.credentials.append(bundle.credentials[0])
    assert _refusal(bundle).where == f"credentials[{len(keyed.bundle.credentials)}]"
    bundle = _copy(keyed.bundle)
    extra = keyed.net.credentials["pboc"]  # genuine, but no bundled transaction's signer
    bundle.credentials.append(extra)
    err = _refusal(bundle)
    assert "not the credential of a bundled" in str(err)
    bundle = _copy(keyed.bundle)
    del bundle.credentials[0]
    assert _refusal(bundle).where in ("credentials[0]", "credentials")


def test_genesis_signature_duplicates_and_disorder_are_refused(keyed) -> None:  # type: ignore[no-untyped-def]
    bundle = _copy(keyed.bundle)
    bundle.genesis.signatures.append(bundle.genesis.signatures[0])
    assert _refusal(bundle).where == "genesis"
    bundle = _copy(keyed.bundle)
    sigs = list(bundle.genesis.signatures)
    del bundle.genesis.signatures[:]
    bundle.genesis.signatures.extend(reversed(sigs))
    err = _refusal(bundle)
    assert err.where == "genesis" and "ascending agency order" in str(err)


def test_swapped_genesis_is_named_with_the_expected_chain(keyed) -> None:  # type: ignore[no-untyped-def]
    bundle = _copy(keyed.bundle)
    bundle.genesis.CopyFrom(make_net(chain_id="another-chain").signed_genesis)
    err = _refusal(bundle)
    assert err.where == "genesis"
    assert "'test-chain'" in str(err) and "'another-chain'" in str(err)
    # a genesis of the same chain id made with other keys is named too
    bundle.genesis.CopyFrom(make_net().signed_genesis)
    assert _refusal(bundle).where == "genesis"


def test_salt_flip_is_named_as_the_reveal_and_its_salt(keyed) -> None:  # type: ignore[no-untyped-def]
    at = keyed.data.find(keyed.salt)
    bad = bytearray(keyed.data)
    bad[at + 5] ^= 0x40
    err = _refusal(bytes(bad))
    assert err.where == "reveals[0]" and "salt" in str(err)


def test_attestation_of_another_block_is_named_as_that_attestation(keyed) -> None:  # type: ignore[no-untyped-def]
    bundle = _copy(keyed.bundle)
    bundle.headers[4].attestations[2].CopyFrom(bundle.headers[1].attestations[2])
    err = _refusal(bundle)
    assert err.where == "headers[4].attestations[2]"
    assert "attestation of another block" in str(err)


def test_result_code_a_quorum_signed_against_the_key_history_is_refused(keyed) -> None:  # type: ignore[no-untyped-def]
    """Even a quorum's signature does not make a revoked signer's transaction OK."""
    from exchange.ledger import merkle
    from exchange.ledger.block import attest, block_hash

    net, store = keyed.net, keyed.store
    codes = store.results(5)
    codes[0] = "OK"  # the revoked newcomer's probe
    bundle = _copy(keyed.bundle)
    header = bundle.headers[4]
    hash_ = block_hash(header.header)
    del header.attestations[:]
    header.attestations.extend(attest(net.chain_id, a, 5, hash_, codes, net.nodes[a])
                               for a in sorted(net.nodes))
    leaves = [c.encode() for c in codes]
    for t in bundle.transactions:
        if t.height == 5:
            t.result_code = codes[t.index]
            del t.result_proof[:]
            t.result_proof.extend(merkle.inclusion_proof(leaves, t.index))
    err = _refusal(bundle)
    assert err.where == "transactions[3]" and "SIGNER_NOT_VALID" in str(err)


def test_headers_past_the_highest_transaction_are_refused(keyed) -> None:  # type: ignore[no-untyped-def]
    bundle = build_bundle(keyed.store, [_tx_at(keyed.store, 2, 0)])
    header, sig = keyed.store.header(3)
    bundle.headers.append(evidence_pb2.BundledHeader(header=header, proposer_signature=sig))
    err = _refusal(bundle)
    assert err.where == "headers[2]" and "beyond every bundled transaction" in str(err)


def test_reveal_part_other_than_the_payload_is_refused(keyed) -> None:  # type: ignore[no-untyped-def]
    bundle = _copy(keyed.bundle)
    bundle.reveals[0].part = "chunk:0"
    err = _refusal(bundle)
    assert err.where == "reveals[0]" and "chunk" in str(err)


# -- any changed byte is refused, naming the part that holds it -------------------------
_PARTS = {1: "version", 2: "genesis", 3: "credentials", 4: "headers", 5: "transactions",
          6: "reveals", 7: "case_statements", 9: "key_history"}


def _varint(data: bytes, at: int) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        byte = data[at]
        value |= (byte & 0x7F) << shift
        at += 1
        if not byte & 0x80:
            return value, at
        shift += 7


def part_map(data: bytes) -> list[str | None]:
    """For each byte of an encoded bundle, the part whose content holds it (None for the
    magic, the top-level tags and lengths and the version's varint, which change the
    framing: any refusal may name them)."""
    out: list[str | None] = [None] * len(data)
    counts: dict[int, int] = {}
    at = len(MAGIC)
    while at < len(data):
        key, at = _varint(data, at)
        field, wire = key >> 3, key & 7
        if wire == 0:
            _, end = _varint(data, at)
            start = at
        else:
            assert wire == 2
            length, start = _varint(data, at)
            end = start + length
        i = counts.get(field, 0)
        counts[field] = i + 1
        name = _PARTS[field] if field in (1, 2) else f"{_PARTS[field]}[{i}]"
        if wire == 2:  # (a top-level varint's bytes are its framing too)
            for offset in range(start, end):
                out[offset] = name
        at = end
    return out


def _assert_refused_naming(data: bytes, offset: int, mask: int, parts: list[str | None]
                           ) -> None:
    bad = bytearray(data)
    bad[offset] ^= mask
    with pytest.raises(BundleInvalid) as err:
        verify_bundle(bytes(bad))
    part = parts[offset]
    if part is not None:
        assert err.value.where == part or err.value.where.startswith(f"{part}."), (
            offset, part, str(err.value))


def test_every_single_bit_flip_of_a_keyed_bundle_is_refused_naming_its_part(keyed) -> None:  # type: ignore[no-untyped-def]
    parts = part_map(keyed.data)
    named = set()
    for offset in range(len(keyed.data)):
        _assert_refused_naming(keyed.data, offset, 0x01, parts)
        named.add(parts[offset])
    assert {"genesis", "key_history[1]", "credentials[0]", "reveals[0]"} <= named


@settings(max_examples=400, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.data())
def test_any_changed_byte_is_refused_naming_its_part(keyed, data) -> None:  # type: ignore[no-untyped-def]
    blob = keyed.data
    offset = data.draw(st.integers(0, len(blob) - 1), label="offset")
    mask = data.draw(st.integers(1, 255), label="xor")
    _assert_refused_naming(blob, offset, mask, part_map(blob))


# -- an answer in chunks (docs/evidence-bundle.md section 4.3) ---------------------------
def _reforged_last_block(bundle: evidence_pb2.EvidenceBundle, store: BlockStore, net: Net,
                         index: int, envelope: bytes) -> None:
    """Replace the envelope at `index` of the bundle's last block, with the block
    re-signed by its proposer and re-attested by every member, as colluding members
    could: everything but the manifest's own consistency checks out."""
    from exchange.identity.keys import Domain
    from exchange.ledger import merkle
    from exchange.ledger.block import attest, block_hash

    height = len(bundle.headers)
    leaves = store.envelopes(height)
    leaves[index] = envelope
    header = ledger_pb2.BlockHeader.FromString(bundle.headers[-1].header)
    header.tx_root = merkle.root(leaves)
    raw = header.SerializeToString(deterministic=True)
    codes = store.results(height)
    bundle.headers[-1].CopyFrom(evidence_pb2.BundledHeader(
        header=raw, proposer_signature=net.nodes[header.proposer].sign(
            Domain.BLOCK, net.chain_id, raw),
        attestations=[attest(net.chain_id, a, height, block_hash(raw), codes, net.nodes[a])
                      for a in sorted(net.nodes)]))
    for t in bundle.transactions:
        if t.height == height:
            t.envelope = leaves[t.index]
            del t.inclusion_proof[:]
            t.inclusion_proof.extend(merkle.inclusion_proof(leaves, t.index))


def test_an_answer_in_chunks_is_checked_against_its_manifest(tmp_path: Path) -> None:
    from exchange.identity.default_policies import default_policies
    from exchange.ledger.block import RESULT_OK, attest
    from exchange.ledger.sealing import open_sealed
    from tests.support.ledger_net import AGENCIES
    from tests.unit.ledger.test_queries import (
        ACCOUNT_ROWS,
        _ledger,
        _three_chunks,
        chunked_manifest,
        committed_query,
        manifest_for,
    )

    net = make_net(policies=default_policies(AGENCIES))
    led = _ledger(net, tmp_path / "s.db")
    query_tx = committed_query(led)
    chunks = _three_chunks(led, query_tx)
    assert led.block(*[c.envelope for c in chunks]) == ("OK", "OK", "OK")
    manifest = manifest_for(led, query_tx, chunks, len(ACCOUNT_ROWS))
    assert led.one(manifest) == RESULT_OK
    store = led.applier.store
    for h in range(1, store.height + 1):
        store.add_attestations([attest(net.chain_id, a, h, store.block_hash_at(h),
                                       store.results(h), net.nodes[a]) for a in net.nodes])
    reveals = []
    for i, c in enumerate(chunks):
        plaintext, salt = open_sealed(c.sealed, net.data_keys["tax"], chain_id=net.chain_id,
                                      context_tx_id=query_tx, chunk=i)
        reveals.append(evidence_pb2.Reveal(tx_id=c.tx_id, salt=salt, plaintext=plaintext))
    ids = [query_tx, *(c.tx_id for c in chunks), tx_id(ledger_pb2.Envelope.FromString(
        manifest).body)]
    bundle = build_bundle(store, ids, reveals)
    report = verify_bundle(encode_bundle(bundle))
    assert report.transactions[-1].kind == "answer_manifest" and report.transactions[-1].revealed
    assert [t.index for t in report.transactions[1:4]] == [0, 1, 2]

    # the manifest lists the chunks in another order (its commitment follows that order)
    swapped = [chunks[1], chunks[0], chunks[2]]
    forged = _copy(bundle)
    _reforged_last_block(forged, store, net, 0, manifest_for(led, query_tx, swapped, 5))
    err = _refusal(forged)
    assert err.where == "transactions[1]" and "not the chunk the manifest" in str(err)
    # the manifest lists the right chunks but commits to other contents
    forged = _copy(bundle)
    _reforged_last_block(forged, store, net, 0, chunked_manifest(
        led, query_tx, [c.tx_id for c in chunks],
        [bytes(c.sealed.commitment) for c in reversed(chunks)], 5))
    err = _refusal(forged)
    assert err.where == "transactions[4]" and "hash of its chunks" in str(err)
    # a reveal addressed to the manifest is refused: its chunks are revealed one by one
    forged = _copy(bundle)
    forged.reveals.append(evidence_pb2.Reveal(tx_id=ids[-1], salt=bytes(32), plaintext=b""))
    err = _refusal(forged)
    assert err.where == "reveals[3]" and "chunk by chunk" in str(err)
