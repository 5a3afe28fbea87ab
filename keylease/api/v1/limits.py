"""The size of every variable-length field of keylease.v1, in one place for both sides.

The broker refuses a request over these limits with INVALID_ARGUMENT; the agent never sends one
(it checks its event log and metadata against the same numbers before sending). Generous for
real TPMs and firmware, small enough that a hostile peer cannot make the other side parse
megabytes of garbage. ``MAX_ADMIN_*`` bound the admin API's messages (admin.proto) between the
operator's ``keylease-kbs`` and the broker.
"""

from __future__ import annotations

__all__ = [
    "MAX_ADMIN_REPLY",
    "MAX_ADMIN_REQUEST",
    "MAX_APPROVALS",
    "MAX_APPROVAL_TEXT",
    "MAX_APPROVED_COMPONENTS",
    "MAX_EK_CERTIFICATE",
    "MAX_ENROLLMENT_ID",
    "MAX_EVENT_LOG",
    "MAX_LEASE_SECONDS",
    "MAX_MESSAGE",
    "MAX_METADATA_ENTRIES",
    "MAX_METADATA_TEXT",
    "MAX_NODE_NAME",
    "MAX_NONCE",
    "MAX_PCR_BANK",
    "MAX_PCR_BANKS",
    "MAX_PCR_INDEX",
    "MAX_PCR_VALUE",
    "MAX_POLICY_GROUP",
    "MAX_PROOF",
    "MAX_QUOTE",
    "MAX_RELEASE_MESSAGE",
    "MAX_RELEASE_SIGNATURE",
    "MAX_SIGNATURE",
    "MAX_SIGNING_CERTIFICATE",
    "MAX_TPM_PUBLIC",
    "MAX_WATCH_REASON",
]

MAX_NODE_NAME = 63
MAX_EK_CERTIFICATE = 8192  # X.509 DER
MAX_TPM_PUBLIC = 1024  # TPM2B_PUBLIC
MAX_QUOTE = 2048  # TPM2B_ATTEST
MAX_SIGNATURE = 1024  # TPMT_SIGNATURE
MAX_EVENT_LOG = 1 << 20  # TCG PC Client crypto-agile boot event log
MAX_METADATA_ENTRIES = 32
MAX_METADATA_TEXT = 256  # each metadata key and value
MAX_PROOF = 64  # the secret ActivateCredential returns
MAX_ENROLLMENT_ID = 64
MAX_NONCE = 64
MAX_PCR_BANK = 16
MAX_PCR_BANKS = 4  # banks in one quote (sha1, sha256, sha384; one spare)
MAX_PCR_VALUE = 64
MAX_PCR_INDEX = 23
MAX_WATCH_REASON = 200  # what the agent keeps of a watch event's text
MAX_SIGNING_CERTIFICATE = 4096  # a release's signing certificate, X.509 DER
MAX_RELEASE_SIGNATURE = 256  # a release's ECDSA signature, DER (72 bytes for P-256)
MAX_POLICY_GROUP = 1024  # a release's policy group: the node's policy names, joined by ","
MAX_APPROVALS = 256  # approvals in one release or watch event, and held by one agent
MAX_APPROVED_COMPONENTS = 128  # components described in one approval
MAX_APPROVAL_TEXT = 400  # an approval's origin, and each component's name, value and summary
MAX_LEASE_SECONDS = 90 * 86400  # the longest lease a broker gives (`lease_seconds`)
MAX_MESSAGE = 2 << 20  # any node request, whole (the broker's gRPC receive limit)
MAX_RELEASE_MESSAGE = 4 << 20  # any broker reply, whole (the agent's gRPC receive limit)
MAX_ADMIN_REQUEST = 2 << 20  # an admin API request, whole (it carries at most a 1 MiB key file)
MAX_ADMIN_REPLY = 256 << 20  # an admin API reply, whole (a listing of every node of a fleet)
