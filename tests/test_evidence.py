"""Evidence bundles: export, offline verification, and tampering of every byte."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
from click.testing import CliRunner

from exchange.cli.main import _register, cli
from exchange.ledger.block import tx_id
from exchange.ledger.evidence import (
    MAGIC,
    BundleInvalid,
    build_bundle,
    decode_bundle,
    encode_bundle,
    verify_bundle,
)
from exchange.v1 import evidence_pb2, ledger_pb2
from tests.ledger_net import make_net, write_chain


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
    from tests.ledger_net import probe

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
