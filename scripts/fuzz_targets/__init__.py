"""The fuzz targets of ``scripts.fuzz``: every parser of untrusted bytes, through its public entry
point, with the only exceptions it may raise (its package's error root) and seed inputs.

Each target is a small function of the input bytes that calls one entry point, so that when a
parser moves (issue 9 rewrites the event log parser, issue 12 the key bundle), re-pointing the
target is one line. Anything other than the package's own errors escaping a target is a crash.

- ``tpm_public``: ``kbs.tpm.objects.parse_public`` + ``check_ak_attributes``; ``KbsError``
- ``quote``: ``kbs.quote.verify_quote``, over raw bytes or over a fuzzed TPMS_ATTEST that this
  harness signs with its AK (so the checks after the signature are reached); ``KbsError``
- ``event_log``: ``kbs.eventlog.verify_event_log`` (``keylease.eventlog``'s parse, replay and boot
  state); ``KbsError``
- ``ek_certificate``: ``kbs.tpm.ekcert.verify_ek_certificate`` + ``check_ek_matches`` +
  ``ek_hash``, against a root and an intermediate; ``KbsError``
- ``node_requests``: the node service's request parsing (protobuf, then ``_enrollment_request``,
  ``_evidence``, the name checks); ``KbsError``
- ``release_bundle``: ``agent.release.parse_bundle`` (the decrypted KeyBundle); ``AgentError``
- ``release_cache``: ``agent.keystore.SealedCache.load`` + ``changed_pcrs`` (``release.bin``,
  ``release-pcrs.json``); ``AgentError``
- ``approvals``: ``agent.keystore.ApprovalStore.load`` + ``verify_approval`` (``approvals.bin``,
  the broker's approvals, checked as ``agent.approvals.accepted`` does); ``AgentError``
- ``agent_config``: ``agent.config.load_config``; ``agent.errors.ConfigError``
- ``kbs_config``: ``kbs.config.load_config``; ``kbs.errors.ConfigError``

The targets live by what they parse: ``tpm`` (public areas, quotes), ``ekcert``, ``wire`` (node
requests, the event log), ``node`` (the key bundle and the sealed cache), ``approvals``,
``configs``; ``common``
holds the keys they derive from fixed numbers. Import this package only once the fuzzer's
instrumentation is in place (``scripts.fuzz`` does).
"""

from __future__ import annotations

from agent.errors import AgentError
from agent.errors import ConfigError as AgentConfigError
from kbs.errors import ConfigError as KbsConfigError
from kbs.errors import KbsError
from scripts.fuzz_targets.approvals import approval_seeds, fuzz_approvals
from scripts.fuzz_targets.common import SCRATCH_ENV, Target
from scripts.fuzz_targets.configs import (
    agent_config_seeds,
    fuzz_agent_config,
    fuzz_kbs_config,
    kbs_config_seeds,
)
from scripts.fuzz_targets.ekcert import ek_seeds, fuzz_ek_certificate
from scripts.fuzz_targets.node import (
    bundle_seeds,
    cache_seeds,
    fuzz_release_bundle,
    fuzz_release_cache,
)
from scripts.fuzz_targets.tpm import fuzz_quote, fuzz_tpm_public, public_seeds, quote_seeds
from scripts.fuzz_targets.wire import (
    event_log_seeds,
    fuzz_event_log,
    fuzz_node_requests,
    request_seeds,
)

__all__ = ["SCRATCH_ENV", "TARGETS", "Target"]

TARGETS: dict[str, Target] = {
    "tpm_public": Target(fuzz_tpm_public, (KbsError,), public_seeds, ("kbs.tpm.objects",)),
    "quote": Target(fuzz_quote, (KbsError,), quote_seeds, ("kbs.quote",)),
    "event_log": Target(
        fuzz_event_log,
        (KbsError,),
        event_log_seeds,
        (
            "kbs.eventlog",
            "keylease.eventlog.parse",
            "keylease.eventlog.replay",
            "keylease.eventlog.events",
            "keylease.eventlog.bootstate",
        ),
        max_len=65536,
    ),
    "ek_certificate": Target(
        fuzz_ek_certificate, (KbsError,), ek_seeds, ("kbs.tpm.ekcert",), max_len=8192
    ),
    "node_requests": Target(
        fuzz_node_requests,
        (KbsError,),
        request_seeds,
        ("kbs.nodeapi.service", "kbs.model"),
        max_len=8192,
    ),
    "release_bundle": Target(
        fuzz_release_bundle,
        (AgentError,),
        bundle_seeds,
        ("agent.release", "agent.keystore.ocikey"),
        max_len=8192,
    ),
    "release_cache": Target(
        fuzz_release_cache, (AgentError,), cache_seeds, ("agent.keystore.cache", "agent.state")
    ),
    "approvals": Target(
        fuzz_approvals,
        (AgentError,),
        approval_seeds,
        ("agent.keystore.approvals", "keylease.api.v1.approvals", "keylease.api.v1.signing"),
    ),
    "agent_config": Target(
        fuzz_agent_config,
        (AgentConfigError,),
        agent_config_seeds,
        ("agent.config", "keylease.tomlfile"),
    ),
    "kbs_config": Target(
        fuzz_kbs_config,
        (KbsConfigError,),
        kbs_config_seeds,
        ("kbs.config", "keylease.tomlfile"),
    ),
}
