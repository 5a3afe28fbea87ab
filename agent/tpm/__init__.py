"""The agent's one typed facade over the TPM (tpm2-pytss ESAPI): ``Tpm``.

Everything the agent asks of the TPM goes through ``Tpm``: the EK and its certificate, the AK
(ECC P-256, restricted signing, created under the EK), credential activation, quotes, PCRs, and
opening a release (import under the EK + PolicyPCR unseal). Values in and out are bytes and
frozen dataclasses (``agent.blobs``); ESAPI objects never leave this package.

- ``facade``: ``Tpm``, open/close and the commands;
- ``tcti``: opening a TCTI, and flushing what a killed process left in a TPM without a resource
  manager;
- ``tss2``: TSS2 errors become agent errors here and only here; strict unmarshalling;
- ``sessions``: policy sessions, and flushing every session and transient handle in ``finally``;
- ``identity``: the EK (persistent or re-created) and the AK under it, credential activation;
- ``quote``: quotes and PCRs;
- ``authorized``: a release's data key, imported under the EK and unsealed under the broker's
  approval (PolicyPCR, PolicyCounterTimer, PolicyAuthorize);
- ``unseal``: the same under PolicyPCR alone (releases from brokers before issue 11);
- ``clock``: the TPM clock approvals and the lease are measured in.

Resource rules (a TPM without a resource manager has 3 object and 3 session slots): at most the
EK and one child object are loaded at a time, at most one session is open, and every session and
transient handle is flushed in ``finally``; what a killed process left behind is flushed at open.
"""

from agent.blobs import AkBlobs, EkInfo, Quote
from agent.tpm.clock import TpmClock
from agent.tpm.facade import Tpm
from keylease.api.v1 import SealedImport

__all__ = ["AkBlobs", "EkInfo", "Quote", "SealedImport", "Tpm", "TpmClock"]
