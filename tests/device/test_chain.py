"""Chain builder and chain lint on certificates made with `cryptography` (no token needed)."""

import datetime
from types import SimpleNamespace

import pytest

from device_sim.device.chain_builder import NamedCert, build_chain, gather_candidates, load_pem_file
from device_sim.device.chain_lint import ERROR, has_errors, lint_chain
from device_sim.common.errors import UserError

from device_sim.testing import TestCA, pem


def file_pki(prefix):
    """root -> intermediate as certificates (`root`, `inter`) and the intermediate CA (`inter_ca`)."""
    inter_ca = TestCA(f"{prefix}-root").issue_intermediate(f"{prefix}-intermediate")
    return SimpleNamespace(root=inter_ca.issuer.cert, inter=inter_ca.cert, inter_ca=inter_ca)


@pytest.fixture(scope="module")
def pki3():
    """root -> intermediate1 -> intermediate2 -> leaf, plus an unrelated root."""
    pki = file_pki("t")
    inter2_ca = pki.inter_ca.issue_intermediate("t-intermediate2")
    leaf = inter2_ca.issue_leaf("device-7").cert
    return pki, inter2_ca.cert, inter2_ca, leaf


def rules(findings, level=ERROR):
    return sorted({f.rule for f in findings if f.level == level})


def test_builds_leaf_first_up_to_the_root_from_an_unordered_pool(pki3):
    pki, inter2, _, leaf = pki3
    other = file_pki("other")
    chain = build_chain(leaf, [pki.root, other.root, inter2, other.inter, pki.inter])
    assert chain == [leaf, inter2, pki.inter, pki.root]
    assert not has_errors(lint_chain(chain))


def test_chain_to_stops_at_a_named_ca_or_the_leaf(pki3):
    pki, inter2, _, leaf = pki3
    pool = [NamedCert(pki.root, ("my-root",)), NamedCert(inter2, ("int2",)), NamedCert(pki.inter, ("int1",))]
    assert build_chain(leaf, pool, "int2") == [leaf, inter2]
    assert build_chain(leaf, pool, "t-intermediate") == [leaf, inter2, pki.inter]  # by subject CN
    assert build_chain(leaf, pool, "leaf") == [leaf]
    with pytest.raises(UserError, match="not on the issuing path"):
        build_chain(leaf, pool, "nonexistent")


def test_same_name_different_key_is_not_taken_as_issuer(pki3):
    pki, inter2, _, leaf = pki3
    impostor = pki.inter_ca.issue_intermediate("t-intermediate2").cert
    assert build_chain(leaf, [impostor, pki.root], "root") == [leaf]
    findings = lint_chain([leaf, impostor])
    assert "links" in rules(findings)
    assert any("different key" in f.message for f in findings)


def test_missing_intermediate_is_a_link_error_and_misses_the_verified_root(pki3):
    pki, inter2, _, leaf = pki3
    findings = lint_chain([leaf, inter2, pki.root], verified=[pki.root])
    assert "links" in rules(findings)
    assert any("intermediate is missing" in f.message for f in findings)
    # leaf + intermediate2 alone: ends below intermediate1, which is not the verified root
    assert "verified" in rules(lint_chain([leaf, inter2], verified=[pki.root]))
    assert "verified" not in rules(lint_chain([leaf, inter2, pki.inter, pki.root], verified=[pki.root]))


def test_order_and_duplicates(pki3):
    pki, inter2, _, leaf = pki3
    assert "order" in rules(lint_chain([leaf, pki.inter, inter2, pki.root]))
    assert "duplicates" in rules(lint_chain([leaf, inter2, inter2, pki.inter]))


def test_ca_flags_key_usage_and_cn(pki3):
    pki, _, _, _ = pki3
    not_a_ca_ca = pki.inter_ca.issue_intermediate("t-fake-ca", ca=False)
    not_a_ca = not_a_ca_ca.cert
    leaf = not_a_ca_ca.issue_leaf("device-8").cert
    assert "ca-flags" in rules(lint_chain([leaf, not_a_ca, pki.inter, pki.root]))
    ca_leaf = pki.inter_ca.issue_intermediate("device-9").cert
    assert "ca-flags" in rules(lint_chain([ca_leaf, pki.inter, pki.root]))
    bad_cn = pki.inter_ca.issue_leaf("bad id!").cert
    assert "cn" in rules(lint_chain([bad_cn, pki.inter, pki.root]))
    ends_with_dot = pki.inter_ca.issue_leaf("device.").cert
    assert "cn" in rules(lint_chain([ends_with_dot, pki.inter, pki.root]))


def test_expired_and_not_yet_valid(pki3):
    pki, _, _, _ = pki3
    now = datetime.datetime.now(datetime.timezone.utc)
    expired = pki.inter_ca.issue_leaf("old-device", not_before=now - datetime.timedelta(days=40), days=30).cert
    future = pki.inter_ca.issue_leaf("new-device", not_before=now + datetime.timedelta(days=1)).cert
    assert "validity" in rules(lint_chain([expired, pki.inter, pki.root]))
    assert "validity" in rules(lint_chain([future, pki.inter, pki.root]))


def test_gather_candidates_reads_files_and_merges_names(tmp_path, pki3):
    pki, inter2, _, leaf = pki3
    (tmp_path / "bundle.pem").write_bytes(pem(inter2, pki.inter))
    (tmp_path / "root.pem").write_bytes(pem(pki.root))
    pool = gather_candidates(None, files=[tmp_path / "bundle.pem", tmp_path / "root.pem"], extra=[pki.root])
    assert len(pool) == 3
    assert build_chain(leaf, pool, "root")[-1] == pki.root
    assert build_chain(leaf, pool, "root.pem".removesuffix(".pem")) == [leaf, inter2, pki.inter, pki.root]
    (tmp_path / "junk.pem").write_text("not a certificate")
    with pytest.raises(UserError, match="no readable X.509"):
        load_pem_file(tmp_path / "junk.pem")


def test_a_ca_signed_leaf_sent_alone_is_refused_as_the_emulator_refuses_it(pki3):
    pki, inter2, _, leaf = pki3
    findings = lint_chain([leaf])
    assert "verified" in rules(findings)
    assert any("leaf alone" in f.message for f in findings if f.level == ERROR)
    # Named as verified, the leaf's own issuer admits it (the emulator checks the store's CAs).
    assert not has_errors(lint_chain([leaf], verified=[inter2]))
    self_signed = TestCA.self_signed_leaf("device-self").cert
    assert not has_errors(lint_chain([self_signed]))


def test_lint_never_says_ok_where_the_shared_as_sent_check_refuses(pki3):
    from device_sim.common.x509util import chain_problem

    pki, inter2, _, leaf = pki3
    good = [leaf, inter2, pki.inter, pki.root]
    assert chain_problem(good, datetime.datetime.now(datetime.timezone.utc)) is None and not has_errors(lint_chain(good))
    for bad in ([leaf, pki.inter, inter2, pki.root], [leaf, pki.root], [inter2, leaf]):
        assert chain_problem(bad, datetime.datetime.now(datetime.timezone.utc)) is not None
        assert has_errors(lint_chain(bad))
