"""How the agent explains, offline, that no approved state matches this boot: from this boot's own
event log (the committed OVMF logs of the project's VM), it names the component that differs
from every approved state in the broker's wording — and only that one, however many components
the approvals list as absent."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from agent.approvals import Binding
from agent.approvals.choose import choose
from agent.errors import NoApprovedState
from agent.signature import ReleaseTrust
from harness.forge import stranger_signer
from kbs.signing import ReleaseSigner
from keylease.api.v1.approvals import Approval, ApprovedComponent
from keylease.eventlog import analyse

DATA = Path(__file__).resolve().parents[1] / "data" / "eventlogs"
ABSENT_TOO = ("initrd", "bootloader-config", "authorities")  # not measured by this VM


def boot(name: str) -> tuple[bytes, dict[int, bytes]]:
    log = DATA / f"ovmf-{name}.bin"
    meta = json.loads(log.with_suffix(".json").read_text())
    return log.read_bytes(), {int(i): bytes.fromhex(v) for i, v in meta["pcrs"]["sha256"].items()}


@pytest.fixture
def signer(tmp_path: Path) -> ReleaseSigner:
    return stranger_signer(tmp_path)  # a key and certificate shaped like the broker's


def approval_of(name: str, origin: str, signer: ReleaseSigner) -> Approval:
    """An approval as the broker describes one (its components, absent ones included), from
    ``signer``'s certificate; its signatures are never looked at: nothing matches."""
    data, pcrs = boot(name)
    state = analyse(data).states["sha256"]
    shown = [ApprovedComponent(c.name, c.value, c.summary) for c in state.components]
    absent = [ApprovedComponent(n, "absent", "") for n in ABSENT_TOO]
    return Approval(
        node_name="kl-worker", policy_group="vm-boot", bank="sha256",
        pcrs=tuple((i, pcrs[i]) for i in state.touched), clock_limit=10**9,
        components=(*shown, *absent), origin=origin, issued_at=0,
        signing_certificate=signer.certificate,
    )  # fmt: skip


def attempt(approvals: Sequence[Approval], now: str, key: ec.EllipticCurvePublicKey,
            log: bool = True) -> str:  # fmt: skip
    data, pcrs = boot(now)

    def read(bank: str, indices: Sequence[int]) -> Mapping[int, bytes]:
        assert bank == "sha256"
        return {i: pcrs[i] for i in indices}

    binding = Binding("kl-worker", "vm-boot", key)
    with pytest.raises(NoApprovedState) as refused:
        choose(approvals, binding, read, 0, ReleaseTrust(()), lambda: data if log else b"")
    return str(refused.value)


def test_a_boot_nothing_approves_names_the_kernel_command_line_only(
    signer: ReleaseSigner,
) -> None:
    held = [approval_of("base", "verified", signer)]
    text = attempt(held, "cmdline", signer.public_key)
    assert text.startswith(
        "no approved state matches this boot: PCR 8,9, kernel command line [kernel-cmdline] "
        "(EFI stub kernel command line "
    ), text
    assert "is not allowed by policy vm-boot (allowed: EFI stub kernel command line" in text
    assert text.count("[") == 1, f"only the command line differs: {text}"
    without_log = attempt(held, "cmdline", signer.public_key, log=False)
    assert "PCR 9 (sha256) holds a value no approved state has" in without_log


def test_approvals_for_another_key_or_group_are_named_as_such(
    signer: ReleaseSigner, tmp_path: Path
) -> None:
    (tmp_path / "other").mkdir()
    other = stranger_signer(tmp_path / "other")
    held = [approval_of("cmdline", "forged", other)]  # this very state, but another key
    text = attempt(held, "cmdline", signer.public_key)
    assert "no approval of this boot state opens this cache: it is not signed by the key" in text
    held = [replace(approval_of("cmdline", "lab", signer), policy_group="lab-boot")]
    text = attempt(held, "cmdline", signer.public_key)
    assert "it is for policy lab-boot, not vm-boot" in text


def test_a_held_approval_with_a_crafted_certificate_is_refused_not_a_crash(
    signer: ReleaseSigner,
) -> None:
    """Found in review after the approvals fuzz target: picking an approval read the signing
    certificate's key with a narrower catch than the certificate check, so a planted
    ``approvals.bin`` whose approval names a certificate with an invalid X.509 version raised
    InvalidVersion out of the restore. Now it is an approval not signed by the bound key."""
    regressions = Path(__file__).resolve().parents[1] / "data" / "fuzz" / "regressions"
    for crafted in ("invalid-x509-version", "bitstring-name-attribute", "malformed-issuer-name"):
        der = (regressions / f"ek_certificate--{crafted}.bin").read_bytes()
        held = [replace(approval_of("cmdline", "planted", signer), signing_certificate=der)]
        text = attempt(held, "cmdline", signer.public_key)
        assert "it is not signed by the key this cache is bound to" in text, crafted
