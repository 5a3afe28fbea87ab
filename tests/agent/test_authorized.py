"""Releases bound to approvals, opened by a real swtpm (``Tpm.unseal_authorized``): the sealed
object's PolicyAuthorize accepts an approval signed by the key it names, for this node and policy
group, for the PCR values the TPM holds, before the TPM-clock limit — and the TPM refuses each
other case itself, whatever the agent's software checks would have said."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest
from tpm2_pytss import ESAPI, TPM2_CAP, TPM2_HC, TCTILdr

from agent.errors import ReleaseInvalid
from agent.tpm import SealedImport, Tpm
from harness.forge import forged_approval, stranger_signer
from harness.swtpm import Swtpm
from kbs.signing import ReleaseSigner
from kbs.tpm.objects import parse_public
from kbs.tpm.sealing import seal_to_ek
from keylease.api.v1.approvals import Approval
from keylease.api.v1.tpmpolicy import approved_policy, sealed_auth_policy
from keylease.secret import Secret

TpmFactory = Callable[..., Swtpm]
PCRS = (0, 4, 7)
NODE, GROUP = "worker-1", "prod-boot"
HOUR = 3_600_000


def seal(tpm: Tpm, signer: ReleaseSigner, data_key: Secret) -> SealedImport:
    """What the broker does for a release: PolicyAuthorize by ``signer`` for NODE and GROUP."""
    ek = parse_public(tpm.read_ek().public, "ek_public")
    policy = sealed_auth_policy(signer.public_key, NODE, GROUP)
    return seal_to_ek(ek, data_key, policy, "sha256", PCRS)


def approve(tpm: Tpm, signer: ReleaseSigner, limit: int | None = None, **kw: str) -> Approval:
    """An approval of the PCRs the TPM holds now, until ``limit`` (default: an hour on)."""
    pcrs = tpm.read_pcrs("sha256", PCRS)
    until = limit if limit is not None else tpm.clock().clock + HOUR
    return forged_approval(signer, kw.get("node", NODE), kw.get("group", GROUP), pcrs, until)


@pytest.fixture
def broker_key(tmp_path: Path) -> ReleaseSigner:
    (tmp_path / "broker").mkdir()
    return stranger_signer(tmp_path / "broker")  # any P-256 key: the TPM checks its name


def test_an_approval_opens_the_release_in_the_approved_state_only(
    tpm_factory: TpmFactory, broker_key: ReleaseSigner
) -> None:
    data_key = Secret(os.urandom(32))
    swtpm = tpm_factory()
    with Tpm.open(swtpm.tcti) as tpm:
        sealed = seal(tpm, broker_key, data_key)
        state_a = approve(tpm, broker_key)
        assert tpm.unseal_authorized(sealed, state_a, broker_key.public_key) == data_key
        tpm.extend_pcr(4, b"kernel 6.1.0-28")  # the update
        with pytest.raises(ReleaseInvalid, match="PCRs are not the approved values"):
            tpm.unseal_authorized(sealed, state_a, broker_key.public_key)
        state_b = approve(tpm, broker_key)  # the broker approves the new state: same object
        assert tpm.unseal_authorized(sealed, state_b, broker_key.public_key) == data_key
        tpm.extend_pcr(9, b"not covered")  # PCRs the approval does not name do not matter
        assert tpm.unseal_authorized(sealed, state_b, broker_key.public_key) == data_key
    swtpm.restart()  # a reboot into state A: its approval opens it again
    with Tpm.open(swtpm.tcti) as tpm:
        assert tpm.unseal_authorized(sealed, state_a, broker_key.public_key) == data_key


def test_the_tpm_refuses_other_nodes_groups_keys_and_altered_approvals(
    tpm_factory: TpmFactory, broker_key: ReleaseSigner, tmp_path: Path
) -> None:
    other_key = stranger_signer(tmp_path)
    with Tpm.open(tpm_factory().tcti) as tpm:
        sealed = seal(tpm, broker_key, Secret(os.urandom(32)))
        good = approve(tpm, broker_key)
        bound = "it is for another node, policy group or signing key"
        signed = "its authorization is not the release-signing key's signature"
        cases = {
            "another policy group": (approve(tpm, broker_key, group="lab-boot"), bound),
            "another node": (approve(tpm, broker_key, node="worker-2"), bound),
            "signed by another key": (approve(tpm, other_key), signed),
            "a later limit than signed": (replace(good, clock_limit=good.clock_limit + 1), signed),
            "other PCR values than signed": (
                replace(good, pcrs=((0, b"\x01" * 32), *good.pcrs[1:])),
                signed,
            ),
        }
        for what, (approval, reason) in cases.items():
            with pytest.raises(ReleaseInvalid, match="does not open with the approval") as info:
                tpm.unseal_authorized(sealed, approval, broker_key.public_key)
            assert reason in str(info.value), what
            assert "rc 0x" in str(info.value), what
        # signed by another key, and that key named as the binding: the object names the broker's
        with pytest.raises(ReleaseInvalid, match=bound):
            tpm.unseal_authorized(sealed, cases["signed by another key"][0], other_key.public_key)
        assert len(tpm.unseal_authorized(sealed, good, broker_key.public_key)) == 32


def test_an_approval_past_its_limit_in_tpm_time_opens_nothing(
    tpm_factory: TpmFactory, broker_key: ReleaseSigner
) -> None:
    swtpm = tpm_factory()
    with Tpm.open(swtpm.tcti) as tpm:
        sealed = seal(tpm, broker_key, Secret(os.urandom(32)))
        now = tpm.clock().clock
        expired = approve(tpm, broker_key, limit=now)
        with pytest.raises(ReleaseInvalid, match="the approval expired"):
            tpm.unseal_authorized(sealed, expired, broker_key.public_key)
        valid = approve(tpm, broker_key, limit=now + 60_000)
        assert len(tpm.unseal_authorized(sealed, valid, broker_key.public_key)) == 32
    set_clock(swtpm, now + 61_000)  # the TPM's clock moves on a minute
    with Tpm.open(swtpm.tcti) as tpm:
        assert tpm.clock().clock >= now + 61_000
        with pytest.raises(ReleaseInvalid, match="the approval expired"):
            tpm.unseal_authorized(sealed, valid, broker_key.public_key)


def set_clock(swtpm: Swtpm, clock: int) -> None:
    """TPM2_ClockSet (owner auth): the TPM's clock, forward only."""
    with TCTILdr.parse(swtpm.tcti) as loader, ESAPI(loader) as esys:
        esys.clock_set(new_time=clock)


def test_the_approved_policy_is_what_the_tpm_reaches() -> None:
    """approvedPolicy = PolicyPCR then PolicyCounterTimer: any change to values, PCRs or limit
    changes it (so the signature covers all three)."""
    values = {0: bytes(32), 4: b"\x04" * 32}
    digest = approved_policy("sha256", values, 1000)
    assert digest != approved_policy("sha256", values, 1001)
    assert digest != approved_policy("sha256", {0: bytes(32), 4: b"\x05" * 32}, 1000)
    assert digest != approved_policy("sha256", {0: bytes(32)}, 1000)
    assert digest == approved_policy("sha256", dict(reversed(values.items())), 1000)


def test_twenty_openings_leave_no_handles_behind(
    tpm_factory: TpmFactory, broker_key: ReleaseSigner, tmp_path: Path
) -> None:
    """Every session and transient object is flushed, on success and on every refusal (a TPM
    without a resource manager has three of each)."""
    swtpm = tpm_factory()
    other = stranger_signer(tmp_path)
    with Tpm.open(swtpm.tcti) as tpm:
        sealed = seal(tpm, broker_key, Secret(os.urandom(32)))
        good, forged = approve(tpm, broker_key), approve(tpm, other)
        for n in range(20):
            if n % 2:
                tpm.unseal_authorized(sealed, good, broker_key.public_key)
            else:
                with pytest.raises(ReleaseInvalid):
                    tpm.unseal_authorized(sealed, forged, broker_key.public_key)
    with ESAPI(TCTILdr.parse(swtpm.tcti)) as esys:
        _, objects = esys.get_capability(TPM2_CAP.HANDLES, TPM2_HC.TRANSIENT_FIRST, 64)
        _, sessions = esys.get_capability(TPM2_CAP.HANDLES, TPM2_HC.LOADED_SESSION_FIRST, 64)
    assert (len(objects.data.handles), len(sessions.data.handles)) == (0, 0)
