"""The sealed cache: the last release, kept in the state directory for restarts and reboots.

- ``release.bin``: the release as the keylease.v1 ``Release`` message it arrived in, the
  broker's signature included (its approvals are kept apart, ``agent.approvals.store``). It opens
  only in this TPM, in a state the broker approved, and is checked against the broker's signature
  again before a restore installs anything from it (``agent.release``), so a planted or altered
  file is refused.
- ``release-pcrs.json``: the PCR values of the attestation it was released for (public: they are
  in every quote), so that a cache that no longer opens can say which PCR changed, and where its
  lease ends in the TPM's clock (``lease_clock_limit``, from the opened bundle).

This module owns both files: their names, their encoding, and that they come and go together.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence

from google.protobuf.message import DecodeError

from agent.blobs import ReleaseBlob
from agent.errors import AgentError, ReleaseInvalid
from agent.keystore.approvals import ApprovalStore
from agent.state import StateDir
from keylease.api.v1 import SealedImport
from keylease.api.v1 import keylease_pb2 as pb

__all__ = ["RELEASE", "RELEASE_PCRS", "PcrReader", "SealedCache"]

RELEASE = "release.bin"
RELEASE_PCRS = "release-pcrs.json"

PcrReader = Callable[[str, Sequence[int]], Mapping[int, bytes]]
"""Reads PCR values now: ``(bank, indices) -> {index: value}``; may raise an AgentError."""


class SealedCache:
    def __init__(self, state: StateDir) -> None:
        self._state = state

    def load(self) -> ReleaseBlob | None:
        """The cached release, or None when there is none.

        Raises ReleaseInvalid when the file is damaged, StateError when it cannot be read.
        """
        data = self._state.read(RELEASE)
        if data is None:
            return None
        msg = pb.Release()
        try:
            msg.ParseFromString(data)
        except DecodeError:
            raise ReleaseInvalid("the cached release is damaged; it will be replaced") from None
        return ReleaseBlob(
            node_name=msg.node_name,
            sealed=SealedImport(
                duplicate=msg.duplicate,
                in_sym_seed=msg.in_sym_seed,
                sealed_public=msg.sealed_public,
                pcr_bank=msg.pcr_bank,
                pcr_indices=tuple(msg.pcr_indices),
            ),
            bundle_nonce=msg.bundle_nonce,
            bundle_ciphertext=msg.bundle_ciphertext,
            signing_certificate=msg.signing_certificate,
            signature=msg.signature,
            policy_group=msg.policy_group,
        )

    def save(
        self, release: ReleaseBlob, quoted: Mapping[int, bytes], lease_clock_limit: int = 0
    ) -> None:
        """Keep ``release``, the values of the PCRs it covers out of ``quoted`` (the PCR values
        of the quote it was released for) and where its lease ends in TPM time."""
        sealed = release.sealed
        pcrs = {i: quoted[i] for i in sealed.pcr_indices if i in quoted}
        record = {
            "bank": sealed.pcr_bank,
            "pcrs": {str(i): v.hex() for i, v in sorted(pcrs.items())},
            "lease_clock_limit": lease_clock_limit,
        }
        self._state.write(RELEASE_PCRS, json.dumps(record, sort_keys=True).encode())
        self._state.write(
            RELEASE,
            pb.Release(
                node_name=release.node_name,
                duplicate=sealed.duplicate,
                in_sym_seed=sealed.in_sym_seed,
                sealed_public=sealed.sealed_public,
                pcr_bank=sealed.pcr_bank,
                pcr_indices=list(sealed.pcr_indices),
                bundle_nonce=release.bundle_nonce,
                bundle_ciphertext=release.bundle_ciphertext,
                signing_certificate=release.signing_certificate,
                signature=release.signature,
                policy_group=release.policy_group,
            ).SerializeToString(),
        )

    def drop(self) -> None:
        """Remove the cache, and the approvals that open it (a verdict: the node was denied)."""
        self._state.remove(RELEASE)
        self._state.remove(RELEASE_PCRS)
        ApprovalStore(self._state).drop()

    def changed_pcrs(self, read_pcrs: PcrReader) -> str:
        """ "; PCR 7 (sha256) changed since the release was sealed" — or "" when that cannot be
        told (no record, a damaged one, or the TPM cannot be read)."""
        recorded = self._sealed_pcrs()
        if recorded is None:
            return ""
        bank, sealed = recorded
        try:
            now = read_pcrs(bank, sorted(sealed))
        except AgentError:
            return ""
        changed = [i for i in sorted(sealed) if now.get(i) != sealed[i]]
        if not changed:
            return ""
        return f"; PCR {','.join(map(str, changed))} ({bank}) changed since the release was sealed"

    def lease_clock_limit(self) -> int | None:
        """Where the cached release's lease ends in the TPM's clock (ms), if recorded."""
        data = self._state.read(RELEASE_PCRS)
        try:
            value = json.loads(data)["lease_clock_limit"] if data is not None else None
        except (ValueError, KeyError, TypeError):
            return None
        return value if isinstance(value, int) and value > 0 else None

    def _sealed_pcrs(self) -> tuple[str, dict[int, bytes]] | None:
        data = self._state.read(RELEASE_PCRS)
        if data is None:
            return None
        try:
            raw = json.loads(data)
            return str(raw["bank"]), {int(i): bytes.fromhex(v) for i, v in raw["pcrs"].items()}
        except (ValueError, KeyError, TypeError, AttributeError):
            return None
