"""agent.tpm against real swtpms, with the broker's TPM objects (kbs.tpm.objects,
kbs.tpm.credential, kbs.tpm.sealing) on the other side. Nothing is mocked."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from tpm2_pytss import (
    ESAPI,
    ESYS_TR,
    TPM2_CAP,
    TPM2_HC,
    TPM2B_ATTEST,
    TPM2B_PUBLIC,
    TPMA_OBJECT,
    TPMS_ATTEST,
    TPMT_SIGNATURE,
    TCTILdr,
)

from agent.errors import ReleaseInvalid, TpmError, TpmUnavailable
from agent.tpm import SealedImport, Tpm
from harness.swtpm import Swtpm
from kbs.errors import AkAttributesInvalid, InvalidRequest
from kbs.tpm.credential import make_credential, new_challenge_secret
from kbs.tpm.objects import TpmPublic, check_ak_attributes, parse_public
from kbs.tpm.sealing import seal_to_ek
from keylease.api.v1.tpmpolicy import policy_pcr_digest
from keylease.secret import Secret

TpmFactory = Callable[..., Swtpm]
SEALED_PCRS = (0, 4, 7)


def seal(tpm: Tpm, data_key: Secret, indices: tuple[int, ...] = SEALED_PCRS) -> SealedImport:
    """What a broker before issue 11 did for a release: seal to the TPM's EK under PolicyPCR
    over its current PCR values (agents still open such releases)."""
    ek = parse_public(tpm.read_ek().public, "ek_public")
    pcrs = tpm.read_pcrs("sha256", indices)
    sealed = seal_to_ek(ek, data_key, policy_pcr_digest("sha256", pcrs), "sha256", indices)
    return SealedImport(
        duplicate=sealed.duplicate,
        in_sym_seed=sealed.in_sym_seed,
        sealed_public=sealed.sealed_public,
        pcr_bank=sealed.pcr_bank,
        pcr_indices=sealed.pcr_indices,
    )


def handles_in_use(tcti: str) -> dict[str, int]:
    """Transient objects and loaded sessions left in the TPM (read with tpm2-pytss directly)."""
    with ESAPI(TCTILdr.parse(tcti)) as ectx:
        _, objects = ectx.get_capability(TPM2_CAP.HANDLES, TPM2_HC.TRANSIENT_FIRST, 64)
        _, sessions = ectx.get_capability(TPM2_CAP.HANDLES, TPM2_HC.LOADED_SESSION_FIRST, 64)
    return {
        "objects": len(objects.data.handles),
        "sessions": len(sessions.data.handles),
    }


# --- EK, AK, credential activation ----------------------------------------------------------


def test_ek_certificate_matches_ek_and_ak_is_a_restricted_p256_signer(
    tpm_factory: TpmFactory,
) -> None:
    with Tpm.open(tpm_factory().tcti) as tpm:
        ek_info = tpm.read_ek()
        ak = tpm.create_ak()
    cert = x509.load_der_x509_certificate(ek_info.certificate)
    ek = parse_public(ek_info.public, "ek_public")
    assert cert.public_key() == ek.key
    assert ek.name[:2] == b"\x00\x0b"
    public = parse_public(ak.public, "ak_public")
    check_ak_attributes(public)
    assert isinstance(public.key, ec.EllipticCurvePublicKey)
    assert isinstance(public.key.curve, ec.SECP256R1)
    assert public.attributes & TPMA_OBJECT.USERWITHAUTH


def test_activate_credential_returns_the_challenge_secret(tpm_factory: TpmFactory) -> None:
    with Tpm.open(tpm_factory().tcti) as tpm:
        ak = tpm.create_ak()
        ek = parse_public(tpm.read_ek().public, "ek_public")
        secret = new_challenge_secret()
        blob, encrypted = make_credential(ek, parse_public(ak.public, "ak").name, secret.reveal())
        assert tpm.activate_credential(ak, blob, encrypted) == secret


def test_challenge_for_another_tpms_ek_or_another_ak_fails(tpm_factory: TpmFactory) -> None:
    a, b = tpm_factory(), tpm_factory(distinct=True)
    with Tpm.open(a.tcti) as tpm_a, Tpm.open(b.tcti) as tpm_b:
        ek_a = parse_public(tpm_a.read_ek().public, "ek_public")
        ak_a, ak_b = tpm_a.create_ak(), tpm_b.create_ak()
        name_b = parse_public(ak_b.public, "ak").name
        blob, encrypted = make_credential(ek_a, name_b, new_challenge_secret().reveal())
        with pytest.raises(TpmError, match="ActivateCredential"):
            tpm_b.activate_credential(ak_b, blob, encrypted)
        with pytest.raises(TpmError, match="ActivateCredential"):  # right EK, wrong AK name
            tpm_a.activate_credential(ak_a, blob, encrypted)
        with pytest.raises(TpmError, match="credential blob"):
            tpm_a.activate_credential(ak_a, blob[:-1], encrypted)


def test_damaged_ak_blobs_are_tpm_errors(tpm_factory: TpmFactory) -> None:
    with Tpm.open(tpm_factory().tcti) as tpm:
        ak = tpm.create_ak()
        for bad in (
            replace(ak, public=b""),
            replace(ak, public=ak.public + b"\x00"),
            replace(ak, private=ak.private[:10]),
        ):
            with pytest.raises(TpmError, match="AK"):
                tpm.quote(bad, b"nonce")


def test_works_without_the_persistent_ek(tpm_factory: TpmFactory) -> None:
    """A TPM whose EK is not persisted at 0x81010001: the EK is created for each command."""
    swtpm = tpm_factory()
    with ESAPI(TCTILdr.parse(swtpm.tcti)) as ectx:
        persistent = ectx.tr_from_tpmpublic(0x81010001)
        ectx.evict_control(ESYS_TR.OWNER, persistent, 0x81010001)
    data_key = Secret(os.urandom(32))
    with Tpm.open(swtpm.tcti) as tpm:
        ak = tpm.create_ak()
        ek = parse_public(tpm.read_ek().public, "ek_public")
        secret = new_challenge_secret()
        blob, encrypted = make_credential(ek, parse_public(ak.public, "ak").name, secret.reveal())
        assert tpm.activate_credential(ak, blob, encrypted) == secret
        assert tpm.unseal_import(seal(tpm, data_key)) == data_key
        tpm.quote(ak, b"nonce")
    assert handles_in_use(swtpm.tcti) == {"objects": 0, "sessions": 0}


# --- quotes and PCRs ------------------------------------------------------------------------


def test_quote_is_signed_by_the_ak_over_the_qualifying_data(tpm_factory: TpmFactory) -> None:
    qualifying_data = hashlib.sha256(b"label || nonce").digest()
    with Tpm.open(tpm_factory().tcti) as tpm:
        ak = tpm.create_ak()
        quote = tpm.quote(ak, qualifying_data)
    assert list(quote.banks) == ["sha256"]  # provisioned with the sha256 bank only
    assert sorted(quote.banks["sha256"]) == list(range(24))
    attest_2b, used = TPM2B_ATTEST.unmarshal(quote.attest)
    assert used == len(quote.attest)
    signed = bytes(attest_2b.attestationData)
    attest, _ = TPMS_ATTEST.unmarshal(signed)
    assert attest.magic == 0xFF544347
    assert attest.type == 0x8018
    assert bytes(attest.extraData) == qualifying_data
    values = b"".join(quote.banks["sha256"][i] for i in range(24))
    assert bytes(attest.attested.quote.pcrDigest) == hashlib.sha256(values).digest()
    signature, _ = TPMT_SIGNATURE.unmarshal(quote.signature)
    key = parse_public(ak.public, "ak").key
    assert isinstance(key, ec.EllipticCurvePublicKey)
    der = encode_dss_signature(
        int.from_bytes(bytes(signature.signature.ecdsa.signatureR), "big"),
        int.from_bytes(bytes(signature.signature.ecdsa.signatureS), "big"),
    )
    key.verify(der, signed, ec.ECDSA(hashes.SHA256()))


def test_extend_pcr_and_quote_limits(tpm_factory: TpmFactory) -> None:
    with Tpm.open(tpm_factory().tcti) as tpm:
        before = tpm.read_pcrs("sha256", [7])[7]
        tpm.extend_pcr(7, b"bootloader")
        expected = hashlib.sha256(before + hashlib.sha256(b"bootloader").digest()).digest()
        assert tpm.read_pcrs("sha256", [7]) == {7: expected}
        with pytest.raises(TpmError, match="64"):
            tpm.quote(tpm.create_ak(), bytes(65))
        with pytest.raises(TpmError, match="sha1"):
            tpm.read_pcrs("sha1", [0])  # provisioned with the sha256 bank only
        with pytest.raises(TpmError, match="0-23"):
            tpm.extend_pcr(24, b"x")


def test_ak_survives_a_reboot(tpm_factory: TpmFactory) -> None:
    swtpm = tpm_factory()
    with Tpm.open(swtpm.tcti) as tpm:
        ak = tpm.create_ak()
        tpm.extend_pcr(7, b"before reboot")
    swtpm.restart()
    with Tpm.open(swtpm.tcti) as tpm:
        quote = tpm.quote(ak, b"after reboot")
    assert quote.banks["sha256"][7] == bytes(32)  # PCRs were reset


def test_unreachable_or_unnamed_tpm_is_unavailable(tmp_path: Path) -> None:
    tcti = f"swtpm:path={tmp_path}/missing.sock"
    with pytest.raises(TpmUnavailable, match=r"missing\.sock"):
        Tpm.open(tcti)
    with pytest.raises(TpmUnavailable, match="bare"):
        Tpm.open("swtpm")


# --- sealing: TPM-bound release -------------------------------------------------------------


def test_sealed_data_key_opens_in_its_tpm(tpm_factory: TpmFactory) -> None:
    data_key = Secret(os.urandom(32))
    with Tpm.open(tpm_factory().tcti) as tpm:
        sealed = seal(tpm, data_key)
        assert tpm.unseal_import(sealed) == data_key
        assert tpm.unseal_import(sealed) == data_key  # the same release opens again (cache)


def test_sealed_data_key_does_not_open_in_another_tpm(tpm_factory: TpmFactory) -> None:
    a, b = tpm_factory(), tpm_factory(distinct=True)
    with Tpm.open(a.tcti) as tpm_a:
        sealed = seal(tpm_a, Secret(os.urandom(32)))
    with Tpm.open(b.tcti) as tpm_b, pytest.raises(ReleaseInvalid, match="does not open"):
        tpm_b.unseal_import(sealed)


def test_sealed_data_key_follows_the_sealed_pcrs_only(tpm_factory: TpmFactory) -> None:
    data_key = Secret(os.urandom(32))
    swtpm = tpm_factory()
    with Tpm.open(swtpm.tcti) as tpm:
        sealed = seal(tpm, data_key)
        tpm.extend_pcr(9, b"not sealed")
        assert tpm.unseal_import(sealed) == data_key
        tpm.extend_pcr(4, b"new kernel")
        with pytest.raises(ReleaseInvalid, match="PCR values differ"):
            tpm.unseal_import(sealed)
    swtpm.restart()  # a reboot into the sealed state opens it again
    with Tpm.open(swtpm.tcti) as tpm:
        assert tpm.unseal_import(sealed) == data_key


def test_malformed_releases_are_release_invalid(tpm_factory: TpmFactory) -> None:
    with Tpm.open(tpm_factory().tcti) as tpm:
        sealed = seal(tpm, Secret(os.urandom(32)))
        other = seal(tpm, Secret(os.urandom(32)))
        ak_public = tpm.create_ak().public
        for bad in (
            replace(sealed, duplicate=b""),
            replace(sealed, duplicate=sealed.duplicate[:-1]),
            replace(sealed, in_sym_seed=sealed.in_sym_seed + b"\x00"),
            replace(sealed, sealed_public=os.urandom(80)),
            replace(sealed, sealed_public=ak_public),
            replace(sealed, duplicate=other.duplicate),  # integrity check fails
            replace(sealed, in_sym_seed=other.in_sym_seed),
            replace(sealed, pcr_indices=()),
            replace(sealed, pcr_indices=(0, 4)),  # PolicyPCR over other PCRs than sealed
            replace(sealed, pcr_indices=(7, 4, 0)),
            replace(sealed, pcr_indices=(0, 4, 24)),
            replace(sealed, pcr_bank="sha1"),
            replace(sealed, pcr_bank="sha512"),
        ):
            with pytest.raises(ReleaseInvalid):
                tpm.unseal_import(bad)
        assert len(tpm.unseal_import(sealed)) == 32


def test_seal_refuses_unbound_or_oversized_input(tpm_factory: TpmFactory) -> None:
    with Tpm.open(tpm_factory().tcti) as tpm:
        ek = parse_public(tpm.read_ek().public, "ek_public")
        ak = parse_public(tpm.create_ak().public, "ak_public")
        policy = policy_pcr_digest("sha256", tpm.read_pcrs("sha256", SEALED_PCRS))
    key = Secret(bytes(32))
    with pytest.raises(InvalidRequest, match="empty"):
        seal_to_ek(ek, key, policy, "sha256", ())
    with pytest.raises(InvalidRequest, match="sha1, sha256, sha384"):
        seal_to_ek(ek, key, policy, "sha512", (0,))
    with pytest.raises(InvalidRequest, match="out of range"):
        seal_to_ek(ek, key, policy, "sha1", (0, 24))
    with pytest.raises(InvalidRequest, match="128"):
        seal_to_ek(ek, Secret(bytes(129)), policy, "sha256", SEALED_PCRS)
    with pytest.raises(InvalidRequest, match="storage"):
        seal_to_ek(ak, key, policy, "sha256", SEALED_PCRS)
    with pytest.raises(InvalidRequest, match="32 bytes"):
        seal_to_ek(ek, key, policy[:31], "sha256", SEALED_PCRS)


def test_policy_pcr_digest_is_order_independent_and_value_bound() -> None:
    values = {7: bytes(32), 0: b"\x01" * 32}
    digest = policy_pcr_digest("sha256", values)
    assert digest == policy_pcr_digest("sha256", dict(sorted(values.items())))
    assert digest != policy_pcr_digest("sha256", {7: bytes(32), 0: b"\x02" * 32})
    assert digest != policy_pcr_digest("sha256", {7: bytes(32)})
    assert len(digest) == 32


# --- parsing and AK attribute checks (broker side) ------------------------------------------


@pytest.fixture
def ak_public(tpm_factory: TpmFactory) -> bytes:
    with Tpm.open(tpm_factory().tcti) as tpm:
        return tpm.create_ak().public


def test_parse_public_refuses_garbage(ak_public: bytes) -> None:
    not_a_key = [TPM2B_PUBLIC.parse(alg).marshal() for alg in ("hmac:sha256", "aes128cfb")]
    for bad in (
        b"",
        b"\x00",
        b"\x00\x00",
        os.urandom(64),
        ak_public[:-1],
        ak_public[:10],
        ak_public + b"\x00",
        b"\xff\xff" + ak_public[2:],
        *not_a_key,
        bytes(5000),
    ):
        with pytest.raises(InvalidRequest, match="ak_public is not a valid TPM2B_PUBLIC"):
            parse_public(bad, "ak_public")


def test_parse_public_refuses_a_point_off_the_curve(ak_public: bytes) -> None:
    public, _ = TPM2B_PUBLIC.unmarshal(ak_public)
    public.publicArea.unique.ecc.y = bytes(32)
    with pytest.raises(InvalidRequest, match="curve"):
        parse_public(public.marshal(), "ak_public")


def test_parse_public_computes_the_tpm_name(ak_public: bytes) -> None:
    parsed = parse_public(ak_public, "ak_public")
    public, _ = TPM2B_PUBLIC.unmarshal(ak_public)
    assert parsed.name == bytes(public.get_name())
    assert parsed.raw == ak_public


def test_check_ak_attributes(ak_public: bytes, tpm_factory: TpmFactory) -> None:
    check_ak_attributes(parse_public(ak_public, "ak_public"))
    weak = with_attributes(ak_public, clear=TPMA_OBJECT.RESTRICTED)
    with pytest.raises(AkAttributesInvalid, match="restricted"):
        check_ak_attributes(weak)
    movable = with_attributes(ak_public, clear=TPMA_OBJECT.FIXEDTPM | TPMA_OBJECT.FIXEDPARENT)
    with pytest.raises(AkAttributesInvalid, match=r"fixedTPM.*fixedParent"):
        check_ak_attributes(movable)
    with pytest.raises(AkAttributesInvalid, match="sensitiveDataOrigin"):
        check_ak_attributes(with_attributes(ak_public, clear=TPMA_OBJECT.SENSITIVEDATAORIGIN))
    with Tpm.open(tpm_factory().tcti) as tpm:
        ek = parse_public(tpm.read_ek().public, "ek_public")
    with pytest.raises(AkAttributesInvalid, match=r"sign.*decrypt"):
        check_ak_attributes(ek)  # the EK is a decrypt key, not a signing key


def with_attributes(public_bytes: bytes, *, clear: int) -> TpmPublic:
    public, _ = TPM2B_PUBLIC.unmarshal(public_bytes)
    public.publicArea.objectAttributes &= ~clear
    return parse_public(public.marshal(), "ak_public")


# --- resource hygiene -----------------------------------------------------------------------


def test_twenty_rounds_leave_no_handles_behind(tpm_factory: TpmFactory) -> None:
    """Without a resource manager swtpm has 3 object and 3 session slots: a leak shows as
    0x902/0x903 within a few rounds, and in the handle count afterwards."""
    a, b = tpm_factory(), tpm_factory(distinct=True)
    with Tpm.open(b.tcti) as tpm_b:
        foreign = seal(tpm_b, Secret(os.urandom(32)))
    data_key = Secret(os.urandom(32))
    with Tpm.open(a.tcti) as tpm:
        ak = tpm.create_ak()
        sealed = seal(tpm, data_key)
        for round_ in range(20):
            quote = tpm.quote(ak, round_.to_bytes(4, "big"))
            assert len(quote.banks["sha256"]) == 24
            assert tpm.unseal_import(sealed) == data_key
            with pytest.raises(ReleaseInvalid):
                tpm.unseal_import(foreign)
            with pytest.raises(ReleaseInvalid):
                tpm.unseal_import(replace(sealed, pcr_indices=(0, 4)))
    assert handles_in_use(a.tcti) == {"objects": 0, "sessions": 0}


_LEAK = """
import os, sys
from tpm2_pytss import ESAPI, ESYS_TR, TPM2_ALG, TPM2_SE, TPM2B_PUBLIC, TCTILdr, TPMT_SYM_DEF
ectx = ESAPI(TCTILdr.parse(sys.argv[1]))
template = TPM2B_PUBLIC.parse(
    "ecc256:aes128cfb",
    objectAttributes="fixedtpm|fixedparent|sensitivedataorigin|userwithauth|restricted|decrypt",
)
for _ in range(3):
    ectx.create_primary(None, template, ESYS_TR.OWNER)
    ectx.start_auth_session(
        ESYS_TR.NONE, ESYS_TR.NONE, TPM2_SE.POLICY, TPMT_SYM_DEF(algorithm=TPM2_ALG.NULL), 0x000B
    )
os._exit(0)  # killed, as far as the TPM can tell: nothing flushed
"""


def test_handles_a_killed_process_left_in_a_tpm_without_resource_manager_are_flushed(
    tpm_factory: Callable[..., Swtpm], caplog: pytest.LogCaptureFixture
) -> None:
    swtpm = tpm_factory()
    subprocess.run([sys.executable, "-c", _LEAK, swtpm.tcti], check=True, timeout=60)
    assert handles_in_use(swtpm.tcti) == {"objects": 3, "sessions": 3}  # every slot taken
    with Tpm.open(swtpm.tcti) as tpm:
        ak = tpm.create_ak()  # needs the EK and a child loaded, and a session
        tpm.quote(ak, b"nonce")
    assert handles_in_use(swtpm.tcti) == {"objects": 0, "sessions": 0}
    assert "flushed 6 transient object(s)/session(s) left in the TPM" in caplog.text
