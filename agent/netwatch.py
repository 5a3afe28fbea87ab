"""The node's network as the kernel sees it, over netlink (pyroute2).

- ``route_to(host)``: does the kernel have a route to the broker right now? The daemon asks before
  attesting instead of timing out against an unreachable broker.
- ``addresses()``: interface name -> addresses, for enrollment metadata (informational only: trust
  never comes from an address).
- ``NetWatch``: a daemon thread subscribed to link, address and route events; when a link comes up,
  an address is added or a route is added it calls ``on_change(description)``, debounced, so the
  daemon re-attests promptly instead of waiting for its backoff.

pyroute2's ``NetlinkError`` and ``OSError`` are translated here, once: a failed lookup means "no
route" / "no addresses" (logged at DEBUG), a failed watch is logged and retried, and nothing is
raised into the caller's thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import socket
import threading
import time
from collections.abc import Callable
from types import TracebackType
from typing import Any, Final

from pyroute2 import AsyncIPRoute, IPRoute
from pyroute2.netlink.exceptions import NetlinkError
from pyroute2.netlink.rtnl import (
    RTMGRP_IPV4_IFADDR,
    RTMGRP_IPV4_ROUTE,
    RTMGRP_IPV6_IFADDR,
    RTMGRP_IPV6_ROUTE,
    RTMGRP_LINK,
)

__all__ = ["NetWatch", "addresses", "route_to"]

log = logging.getLogger(__name__)

_GROUPS: Final = (
    RTMGRP_LINK | RTMGRP_IPV4_IFADDR | RTMGRP_IPV6_IFADDR | RTMGRP_IPV4_ROUTE | RTMGRP_IPV6_ROUTE
)
_IFF_UP: Final = 0x1
_IFF_LOOPBACK: Final = 0x8
_IFF_LOWER_UP: Final = 0x10000
_RT_TABLE_LOCAL: Final = 255
_RTN_UNICAST: Final = 1
_RTN_LOCAL: Final = 2
_RT_SCOPE_LINK: Final = 253
_RT_SCOPE_HOST: Final = 254
_MAX_DESCRIBED: Final = 6


def route_to(host: str) -> bool:
    """True if ``host`` (a name or an IP literal, no port) resolves to an address the kernel
    routes now. Resolution or netlink failures mean False (logged at DEBUG)."""
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError) as exc:
        log.debug("route to %s: cannot resolve: %s", host, exc)
        return False
    candidates = list(
        dict.fromkeys(
            str(info[4][0]).split("%", 1)[0] for info in infos if isinstance(info[4][0], str)
        )
    )
    try:
        with IPRoute() as ipr:
            for address in candidates:
                if _routable(ipr, address):
                    return True
    except (NetlinkError, OSError) as exc:
        log.debug("route to %s: netlink failed: %s", host, exc)
    return False


def _routable(ipr: Any, address: str) -> bool:
    try:
        answers = list(ipr.route("get", dst=address))
    except NetlinkError as exc:
        log.debug("no route to %s: %s", address, exc)
        return False
    for answer in answers:
        if answer.get("type") in (_RTN_UNICAST, _RTN_LOCAL):
            return True
    log.debug("no usable route to %s", address)
    return False


def addresses() -> dict[str, list[str]]:
    """Interface name -> its non-loopback IPv4/IPv6 addresses (sorted), from a netlink dump.
    A netlink failure gives {} (logged at DEBUG)."""
    try:
        with IPRoute() as ipr:
            links = list(ipr.get_links())
            addrs = list(ipr.get_addr())
    except (NetlinkError, OSError) as exc:
        log.debug("cannot list addresses: %s", exc)
        return {}
    names: dict[int, str] = {}
    for link in links:
        if not link.get("flags", 0) & _IFF_LOOPBACK:
            names[link["index"]] = str(link.get_attr("IFLA_IFNAME"))
    result: dict[str, set[str]] = {}
    for msg in addrs:
        name = names.get(msg.get("index"))
        text = _address_of(msg)
        if name is None or text is None:
            continue
        ip = ipaddress.ip_address(text)
        if not ip.is_loopback:
            result.setdefault(name, set()).add(str(ip))
    return {
        name: sorted(found, key=lambda a: (ipaddress.ip_address(a).version, a))
        for name, found in sorted(result.items())
    }


def _address_of(msg: Any) -> str | None:
    value = msg.get_attr("IFA_LOCAL") or msg.get_attr("IFA_ADDRESS")
    return str(value) if value else None


class NetWatch:
    """Calls ``on_change(description)`` (from its own thread, debounced) when a link comes up, an
    address is added or a route is added. ``on_change`` must be quick (e.g. put on a queue).

    Use as a context manager, or ``start()``/``stop()``; ``stop()`` returns within about a second.
    """

    def __init__(
        self,
        on_change: Callable[[str], None],
        *,
        debounce: float = 0.2,
        max_delay: float = 1.0,
        retry_delay: float = 2.0,
    ) -> None:
        self._on_change = on_change
        self._debounce = debounce
        self._max_delay = max(max_delay, debounce)
        self._retry_delay = retry_delay
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task[None] | None = None
        self._stopping = False

    def __enter__(self) -> NetWatch:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def start(self) -> None:
        with self._lock:
            if self._thread is not None:
                return
            self._stopping = False
            self._thread = threading.Thread(target=self._thread_main, name="netwatch", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 1.0) -> None:
        with self._lock:
            self._stopping = True
            thread, loop, task = self._thread, self._loop, self._task
        if loop is not None and task is not None:
            with contextlib.suppress(RuntimeError):  # the loop has already finished
                loop.call_soon_threadsafe(task.cancel)
        if thread is not None:
            thread.join(timeout)
            if thread.is_alive():
                log.warning("network watch did not stop within %.1f s", timeout)
        with self._lock:
            self._thread = self._loop = self._task = None

    def _thread_main(self) -> None:
        loop = asyncio.new_event_loop()
        try:
            task = loop.create_task(self._supervise())
            with self._lock:
                self._loop, self._task = loop, task
                if self._stopping:
                    task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                loop.run_until_complete(task)
        finally:
            loop.close()

    async def _supervise(self) -> None:
        while True:
            try:
                await self._watch()
            except (NetlinkError, OSError) as exc:
                log.warning("network watch failed (%s); retrying in %.0f s", exc, self._retry_delay)
            except Exception:  # the thread's top-level guard: log it and retry, never die silently
                log.exception("network watch crashed; retrying in %.0f s", self._retry_delay)
            await asyncio.sleep(self._retry_delay)

    async def _watch(self) -> None:
        batch = _Batch(self._on_change, self._debounce, self._max_delay)
        try:
            async with AsyncIPRoute() as ipr:
                await ipr.bind(groups=_GROUPS)
                state = _LinkState()
                for link in await _collect(await ipr.get_links()):
                    state.seen(link)
                log.debug("network watch started")
                while True:
                    async for msg in ipr.get():
                        what = state.describe(msg)
                        if what is not None:
                            batch.add(what)
        finally:
            batch.cancel()


async def _collect(result: Any) -> list[Any]:
    if hasattr(result, "__aiter__"):
        return [item async for item in result]
    return list(result)


class _LinkState:
    """Which links are up (IFF_UP and carrier), and their names, to report only transitions."""

    def __init__(self) -> None:
        self._up: set[int] = set()
        self._names: dict[int, str] = {}
        self._loopback: set[int] = set()

    def seen(self, msg: Any) -> bool:
        """Record a link message; True if the link just came up."""
        index = int(msg.get("index", 0))
        flags = int(msg.get("flags", 0))
        name = msg.get_attr("IFLA_IFNAME")
        if name:
            self._names[index] = str(name)
        if flags & _IFF_LOOPBACK:
            self._loopback.add(index)
        up = flags & (_IFF_UP | _IFF_LOWER_UP) == (_IFF_UP | _IFF_LOWER_UP)
        came_up = up and index not in self._up
        if up:
            self._up.add(index)
        else:
            self._up.discard(index)
        return came_up

    def name(self, index: int) -> str:
        return self._names.get(index, f"if{index}")

    def describe(self, msg: Any) -> str | None:
        """A short description of an interesting event, None for the rest."""
        event = msg.get("event")
        if event == "RTM_NEWLINK":
            return f"link {self.name(int(msg['index']))} up" if self.seen(msg) else None
        if event == "RTM_DELLINK":
            index = int(msg.get("index", 0))
            self._up.discard(index)
            self._names.pop(index, None)
            return None
        if event == "RTM_NEWADDR":
            return self._describe_address(msg)
        if event == "RTM_NEWROUTE":
            return _describe_route(msg, self)
        return None

    def _describe_address(self, msg: Any) -> str | None:
        index = int(msg.get("index", 0))
        address = _address_of(msg)
        if address is None or index in self._loopback:
            return None
        if msg.get("scope") in (_RT_SCOPE_LINK, _RT_SCOPE_HOST):
            return None
        return f"address {address}/{msg.get('prefixlen')} added on {self.name(index)}"


def _describe_route(msg: Any, state: _LinkState) -> str | None:
    table = msg.get_attr("RTA_TABLE") or msg.get("table")
    if table == _RT_TABLE_LOCAL or msg.get("type") != _RTN_UNICAST:
        return None
    dst = msg.get_attr("RTA_DST")
    if dst and ipaddress.ip_address(str(dst)).is_link_local:
        return None
    target = f"{dst}/{msg.get('dst_len')}" if dst else "default"
    text = f"route {target}"
    gateway = msg.get_attr("RTA_GATEWAY")
    if gateway:
        text += f" via {gateway}"
    oif = msg.get_attr("RTA_OIF")
    if oif is not None:
        text += f" dev {state.name(int(oif))}"
    return text + " added"


class _Batch:
    """Trailing debounce: fire ``debounce`` s after the last event, at most ``max_delay`` s after
    the first one, with the distinct descriptions collected meanwhile."""

    def __init__(self, on_change: Callable[[str], None], debounce: float, max_delay: float) -> None:
        self._on_change = on_change
        self._debounce = debounce
        self._max_delay = max_delay
        self._items: dict[str, None] = {}
        self._first = 0.0
        self._timer: asyncio.TimerHandle | None = None

    def add(self, what: str) -> None:
        loop = asyncio.get_running_loop()
        now = time.monotonic()
        if not self._items:
            self._first = now
        self._items[what] = None
        if self._timer is not None:
            self._timer.cancel()
        delay = min(self._debounce, max(0.0, self._first + self._max_delay - now))
        self._timer = loop.call_later(delay, self._fire)

    def cancel(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _fire(self) -> None:
        self._timer = None
        items, self._items = list(self._items), {}
        shown = "; ".join(items[:_MAX_DESCRIBED])
        if len(items) > _MAX_DESCRIBED:
            shown += f"; and {len(items) - _MAX_DESCRIBED} more"
        log.debug("network change: %s", shown)
        try:
            self._on_change(shown)
        except Exception:  # a failing callback must not stop the watch
            log.exception("network change handler failed")
