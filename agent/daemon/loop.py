"""`keylease-agent run`: the node agent as a systemd service (DESIGN.md steps 4-6).

Start-up: keys are restored from the sealed cache first (``agent.daemon.restore``: TPM only, no
network), the node key is recovered with the TPM (``agent.enroll``), then the agent attests.
READY=1 goes to systemd once keys are installed, or after ``startup_timeout_seconds`` without
keys (STATUS= says why). Then, on one worker thread:

- renew at about two thirds of the lease; on failure retry with backoff, no sooner than a busy
  broker asks (``agent.daemon.schedule``); keys stay until the lease ends, then go, and the agent
  attests again at once (the lease is measured on the monotonic clock and the TPM's, never the
  wall clock: ``agent.daemon.lease``);
- only a verified denial removes the keys at once (and the cache); any other failure — broker
  unreachable or busy, credentials refused (it enrolls again), a refusal without a verdict, a
  release that does not open or is not signed by the broker — keeps them until the lease ends;
  retries continue at the backoff pace;
- the broker's watch stream (``agent.watcher``) wakes the loop: REVOKED removes the keys at once,
  CHANGED (grant, key rotation, policy) attests again, and the approvals a widened policy pushes
  are checked and kept (they open the cache offline after a reboot into an approved update); a
  link or address coming up (netlink) wakes a failing loop too.

The main thread only handles signals: SIGTERM/SIGINT stop within 10 s (keys stay unless
``remove_keys_on_stop``), a second one exits at once, SIGHUP reloads the config (an invalid one is
refused and the old one kept). WATCHDOG=1 is sent only after a loop iteration that completed.
If the worker thread dies nonetheless, the process exits 1, so that ``Restart=on-failure``
starts it again.
"""

from __future__ import annotations

import logging
import os
import queue
import random
import signal
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType

from agent.approvals import keep_pushed
from agent.attest import attest_once
from agent.broker import BrokerClient
from agent.config import AgentConfig, load_config
from agent.daemon.lease import Lease
from agent.daemon.restore import restore_from_cache
from agent.daemon.schedule import Schedule
from agent.daemon.wakes import Pushed, Wake
from agent.enroll import NodeCredentials, node_identity
from agent.errors import (
    AgentError,
    AttestationDenied,
    BrokerError,
    BrokerUnreachable,
    ConfigError,
    PendingApproval,
)
from agent.keystore import SealedCache, remove_all_keys
from agent.logsetup import log_fields
from agent.netwatch import NetWatch, route_to
from agent.notify import Notifier
from agent.state import StateDir
from agent.status import AgentStatus, describe, save_status
from agent.tpm import Tpm
from agent.watcher import Watcher

__all__ = ["Daemon"]

log = logging.getLogger(__name__)

STOP_DEADLINE = 8.0  # seconds the worker gets after SIGTERM (systemd's stop budget is 10 s)


class Daemon:
    def __init__(
        self, config_path: Path, cfg: AgentConfig, notifier: Notifier, *, seed: int | None = None
    ) -> None:
        self._config_path = config_path
        self._cfg = cfg
        self._notifier = notifier
        self._rng = random.Random(seed)  # noqa: S311 (jitter, not security)
        self._state = StateDir.open(cfg.state_dir)
        self._status = AgentStatus(node_name=cfg.node_name, pid=os.getpid())
        self._wakes: queue.Queue[Wake | Pushed] = queue.Queue()
        self._stop = threading.Event()
        self._signals = 0
        self._lease: Lease | None = None
        self._schedule = Schedule(cfg.retry_max_seconds, self._rng)
        self._startup_deadline = 0.0
        self._healthy = True
        self._client = BrokerClient(cfg)
        self._credentials = NodeCredentials()
        self._worker_died = False
        self._watcher: Watcher[Wake] = Watcher(
            lambda: self._cfg,
            self._credentials.get,
            self._wakes.put,
            revoked=Wake.REVOKED,
            changed=Wake.CHANGED,
            approvals=lambda pushed: self._wakes.put(Pushed(pushed)),
        )

    # --- main thread ----------------------------------------------------------------------

    def run(self) -> int:
        """Run until SIGTERM/SIGINT; returns the exit code."""
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_stop_signal)
        signal.signal(signal.SIGHUP, lambda _s, _f: self._wakes.put(Wake.RELOAD))
        worker = threading.Thread(target=self._loop, name="keylease-agent", daemon=True)
        with NetWatch(lambda what: self._wakes.put(Wake.NETWORK)):
            worker.start()
            while worker.is_alive() and not self._stop.is_set():
                worker.join(0.5)
            worker.join(STOP_DEADLINE)
        self._watcher.stop()
        if worker.is_alive():
            log.warning("the attestation in progress did not finish in %.0f s", STOP_DEADLINE)
        if self._cfg.remove_keys_on_stop and not worker.is_alive():
            removed = self._remove_all_keys()
            log.info("stopped: removed %d key file(s) (remove_keys_on_stop)", len(removed))
        self._set_status(state="stopped")
        self._notifier.stopping()
        self._client.close()
        log.info("stopped", extra=log_fields(self._cfg.node_name, "stopped"))
        if worker.is_alive():  # a blocked RPC must not hold the process past systemd's budget
            logging.shutdown()
            os._exit(0)
        return 1 if self._worker_died else 0

    def _on_stop_signal(self, signum: int, _frame: FrameType | None) -> None:
        self._signals += 1
        if self._signals > 1:
            os.write(2, b"keylease-agent: second signal, exiting now\n")
            os._exit(1)
        log.info("%s: stopping", signal.Signals(signum).name)
        self._stop.set()
        self._wakes.put(Wake.STOP)

    # --- worker thread --------------------------------------------------------------------

    def _loop(self) -> None:
        try:
            self._run_loop()
        except BaseException:
            log.critical("the agent's worker thread died; exiting 1", exc_info=True)
            self._worker_died = True
            raise

    def _run_loop(self) -> None:
        self._restore()
        self._recover_identity()
        self._startup_deadline = time.monotonic() + self._cfg.startup_timeout_seconds
        self._watcher.start()
        while not self._stop.is_set():
            try:
                self._tick()
                self._healthy = True
            except Exception:  # the daemon's top-level guard: log, stay alive, stop the watchdog
                log.exception("unexpected error in the agent loop; retrying")
                self._healthy = False
                self._schedule.back_off()
                self._sleep_until_woken(5.0)

    def _tick(self) -> None:
        self._expire_lease()
        if not self._notifier.is_ready and time.monotonic() >= self._startup_deadline:
            self._notifier.ready(
                f"no keys after {self._cfg.startup_timeout_seconds:g} s: {describe(self._status)}"
            )
        if self._schedule.due():
            self._attempt()
        if self._healthy:
            self._notifier.watchdog()
        self._sleep_until_woken(self._wait_seconds())

    def _wait_seconds(self) -> float:
        now = time.monotonic()
        deadlines = [self._schedule.next_attempt - now]
        if self._lease is not None:
            deadlines.append(self._lease.remaining())
        if not self._notifier.is_ready:
            deadlines.append(self._startup_deadline - now)
        if self._notifier.watchdog_interval is not None:
            deadlines.append(self._notifier.watchdog_interval / 2)
        return max(0.0, min(deadlines))

    def _sleep_until_woken(self, timeout: float) -> None:
        try:
            wake = self._wakes.get(timeout=timeout)
        except queue.Empty:
            return
        self._on_wake(wake)

    def _on_wake(self, wake: Wake | Pushed) -> None:
        node = self._cfg.node_name
        if isinstance(wake, Pushed):
            keep_pushed(self._cfg, self._state, wake.approvals)
        elif wake is Wake.REVOKED:
            removed = self._remove_all_keys()
            self._lease = None
            reason = "the broker revoked this node"
            log.warning(
                "revoked: removed %d key file(s)",
                len(removed),
                extra=log_fields(node, "revoked", reason),
            )
            now = datetime.now(UTC)
            self._set_status(
                state="denied",
                keys=(),
                lease_not_after=None,
                last_result="denied",
                last_reason=reason,
                last_denial_at=now,
                last_denial_reason=reason,
            )
            self._schedule.back_off()
        elif wake is Wake.CHANGED:
            log.info("%s: attesting again", wake.value, extra=log_fields(node, "changed"))
            self._schedule.soon()
        elif wake is Wake.NETWORK:
            if self._status.last_result != "ok":
                log.info("network changed: attesting again", extra=log_fields(node, "network"))
                self._schedule.soon()
        elif wake is Wake.RELOAD:
            self._reload()

    def _reload(self) -> None:
        self._notifier.reloading()
        try:
            new = load_config(self._config_path)
            StateDir.open(new.state_dir)
        except AgentError as exc:
            log.error(
                "SIGHUP: the new configuration is refused, keeping the running one: %s",
                exc.diagnostics(),
                extra=log_fields(self._cfg.node_name, "reload-refused", str(exc)),
            )
            self._notifier.reloaded(describe(self._status))
            return
        old, self._client = self._client, BrokerClient(new)
        old.close()
        self._cfg, self._state = new, StateDir.open(new.state_dir)
        self._schedule.restart(new.retry_max_seconds)
        self._watcher.restart()
        log.info(
            "SIGHUP: configuration reloaded from %s",
            self._config_path,
            extra=log_fields(new.node_name, "reloaded"),
        )
        self._notifier.reloaded(describe(self._status))

    # --- steps ----------------------------------------------------------------------------

    def _restore(self) -> None:
        restored = restore_from_cache(self._cfg, self._state)
        bundle = restored.bundle
        if restored.clock is not None:
            self._set_status(tpm_clock=restored.clock.clock, tpm_clock_at=datetime.now(UTC))
        if bundle is None and restored.lease is not None:
            self._lease = restored.lease
            self._set_status(
                state=f"nothing restored: {restored.reason}; keys kept until the lease ends",
                keys=restored.kept,
                lease_not_after=restored.lease.not_after,
            )
            self._notifier.ready(describe(self._status))
            return
        if bundle is None:
            self._set_status(
                state=f"nothing restored: {restored.reason}", keys=(), lease_not_after=None
            )
            return
        self._lease = restored.lease
        self._set_status(
            state="keys installed",
            keys=tuple((k.name, k.version) for k in bundle.keys),
            lease_not_after=bundle.not_after,
            lease_clock_limit=bundle.lease_clock_limit or None,
            source="cache",
            approved_state=restored.approval.describe() if restored.approval else None,
        )
        self._notifier.ready(describe(self._status))

    def _recover_identity(self) -> None:
        """The node key, with the TPM only (ActivateCredential), if this node is enrolled."""
        try:
            with Tpm.open(self._cfg.tcti) as tpm:
                self._credentials.set(node_identity(self._cfg, tpm, self._state))
        except AgentError as exc:  # the first attempt enrolls again if it must
            log.warning("cannot recover the node key now: %s", exc.diagnostics())

    def _attempt(self) -> None:
        cfg = self._cfg
        now = datetime.now(UTC)
        asked_at = time.monotonic()
        try:
            if not route_to(cfg.kbs_host):
                raise BrokerUnreachable(f"no route to the broker host {cfg.kbs_host}")
            with Tpm.open(cfg.tcti) as tpm:
                report = attest_once(cfg, tpm, self._client, self._state, self._credentials)
        except AttestationDenied as exc:
            self._lease = None
            self._failed(
                now,
                "denied",
                exc,
                state="denied",
                keys=(),
                lease_not_after=None,
                last_denial_at=now,
                last_denial_reason=str(exc),
            )
            return
        except PendingApproval as exc:
            self._failed(now, "pending", exc, state="pending approval")
            return
        except (BrokerUnreachable, BrokerError) as exc:
            self._failed(now, "unreachable", exc, state="broker unreachable")
            return
        except (AgentError, ConfigError) as exc:
            self._failed(now, "error", exc, state="error")
            return
        bundle = report.bundle
        self._lease = Lease.received(bundle.issued_at, bundle.not_after, asked_at)
        delay = self._schedule.renew(self._lease.remaining())
        log.info(
            "attested: %s installed, lease until %s, renewing in %.0f s",
            bundle.describe(),
            bundle.not_after.isoformat(),
            delay,
            extra={**log_fields(cfg.node_name, "ok"), "KEY": bundle.describe()},
        )
        self._set_status(
            state="keys installed",
            keys=tuple((k.name, k.version) for k in bundle.keys),
            lease_not_after=bundle.not_after,
            lease_clock_limit=bundle.lease_clock_limit or None,
            source="broker",
            approved_state=None,
            tpm_clock=report.clock,
            tpm_clock_at=now,
            last_attestation_at=now,
            last_result="ok",
            last_reason=None,
        )
        if not self._notifier.is_ready:
            self._notifier.ready(describe(self._status))

    def _failed(self, now: datetime, result: str, exc: AgentError, **status: object) -> None:
        delay = self._schedule.retry(exc)
        log.warning(
            "attestation %s: %s; retrying in %.1f s",
            result,
            exc.diagnostics(),
            delay,
            extra=log_fields(self._cfg.node_name, result, str(exc)),
        )
        self._set_status(
            last_attestation_at=now, last_result=result, last_reason=str(exc), **status
        )

    def _expire_lease(self) -> None:
        if self._lease is None or not self._lease.ended():
            return
        removed = self._remove_all_keys()
        reason = (
            f"lease ended (broker's not-after {self._lease.not_after.isoformat()}) without renewal"
        )
        log.warning(
            "%s: removed %d key file(s)",
            reason,
            len(removed),
            extra=log_fields(self._cfg.node_name, "expired", reason),
        )
        self._lease = None
        self._set_status(state=f"no keys: {reason}", keys=(), lease_not_after=None)
        self._schedule.soon()  # only a new lease brings keys back: ask for one now

    def _remove_all_keys(self) -> tuple[str, ...]:
        return remove_all_keys(self._cfg, SealedCache(self._state))

    def _set_status(self, **changes: object) -> None:
        self._status = self._status.with_(**changes)
        try:
            save_status(self._state, self._status)
        except AgentError as exc:
            log.warning("cannot write the status file: %s", exc)
        self._notifier.status(describe(self._status))
