"""Everything a broker request needs, loaded once at start-up and passed down."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime

from kbs.config import KbsConfig
from kbs.eventlog import EventLogCache
from kbs.masterkey import MasterKey, master_keyring
from kbs.signing import ReleaseSigner, SigningKeys, load_signing_keys
from kbs.store import Store
from kbs.tpm.ekcert import EkTrustBundle, load_ek_roots

__all__ = ["BrokerContext", "utc_now"]


def utc_now() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True)
class BrokerContext:
    config: KbsConfig
    store: Store
    ek_roots: EkTrustBundle
    master_key: MasterKey
    signing: SigningKeys  # the release-signing key, and the previous ones kept
    clock: Callable[[], datetime] = utc_now
    event_logs: EventLogCache = field(default_factory=EventLogCache)  # readings of seen logs

    @property
    def signer(self) -> ReleaseSigner:
        """The current release-signing key: releases are signed with it and bound to it."""
        return self.signing.current

    @classmethod
    def load(cls, config: KbsConfig, clock: Callable[[], datetime] = utc_now) -> BrokerContext:
        """Open the database and read the trust bundle, master key and release-signing keys;
        raises KbsError."""
        ek_roots = load_ek_roots(config.ek_roots)
        master_key = master_keyring(config)
        signing = load_signing_keys(config)
        store = Store.open(config.database)
        return cls(
            config=config, store=store, ek_roots=ek_roots, master_key=master_key, signing=signing,
            clock=clock,
        )  # fmt: skip
