"""The one TOML loader behind ``agent.toml`` and ``kbs.toml``: read safely, then typed fields.

``read_toml`` turns every way a file can be wrong into one line naming the file: missing, a
directory, a FIFO or device (never opened for a blocking read), unreadable, too large, not UTF-8
(with the line and byte), not TOML. ``Table`` reads typed values out of the parsed document with
the same wording for every program: unknown keys refused, each value checked for type and range,
relative paths resolved against the file's directory.

Both raise the *caller's* error class (``agent.errors.ConfigError``, ``kbs.errors.ConfigError``),
so each program keeps its one error root and exit code.
"""

from __future__ import annotations

import os
import stat
import tomllib
from collections.abc import Iterable
from pathlib import Path
from typing import Any

__all__ = ["MAX_CONFIG_BYTES", "Table", "read_toml"]

MAX_CONFIG_BYTES = 1 << 20


def read_toml(path: Path, error: type[Exception], *, missing_hint: str) -> dict[str, Any]:
    """Parse ``path``; raises ``error`` with a one-line message (``missing_hint`` says how to
    create a missing file)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise error(f"config file {path} does not exist; {missing_hint}") from None
    except PermissionError:
        raise error(
            f"cannot read config file {path}: permission denied (run as the service's user, "
            "or make the file readable by it)"
        ) from None
    except OSError as exc:
        raise error(f"cannot open config file {path}: {exc.strerror}") from None
    try:
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            raise error(f"config file {path} is a directory; name the TOML file inside it")
        if not stat.S_ISREG(st.st_mode):
            raise error(f"config file {path} is not a regular file (a FIFO, socket or device)")
        if st.st_size > MAX_CONFIG_BYTES:
            raise error(f"config file {path} is larger than {MAX_CONFIG_BYTES} bytes")
        data = _read_all(fd, error, path)
    finally:
        os.close(fd)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise error(
            f"{path}: not UTF-8 text (byte 0x{data[exc.start]:02x} on line {line}); "
            "save it as UTF-8"
        ) from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise error(f"{path}: invalid TOML: {exc}") from None


def _read_all(fd: int, error: type[Exception], path: Path) -> bytes:
    chunks: list[bytes] = []
    total = 0
    try:
        while chunk := os.read(fd, 65536):
            total += len(chunk)
            if total > MAX_CONFIG_BYTES:
                raise error(f"config file {path} is larger than {MAX_CONFIG_BYTES} bytes")
            chunks.append(chunk)
    except OSError as exc:
        raise error(f"cannot read config file {path}: {exc.strerror}") from None
    return b"".join(chunks)


class Table:
    """Typed access to a parsed TOML document; every refusal names the file and the key."""

    def __init__(
        self, raw: dict[str, Any], path: Path, error: type[Exception], known: Iterable[str]
    ) -> None:
        self.raw, self.path, self.error = raw, path, error
        allowed = sorted(set(known))
        unknown = sorted(set(raw) - set(allowed))
        if unknown:
            raise error(
                f"{path}: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(allowed)}"
            )

    def fail(self, key: str, message: str) -> Exception:
        """The error for ``key``: ``path: `key` message``."""
        return self.error(f"{self.path}: `{key}` {message}")

    def text(self, key: str, default: str | None = None, *, empty: bool = False) -> str:
        """A string; required when there is no default; ``empty`` allows ""."""
        value = self.raw.get(key, default)
        if value is None:
            raise self.fail(key, "is required")
        if not isinstance(value, str) or (not value and not empty):
            raise self.fail(key, "must be a non-empty string" if not empty else "must be a string")
        return value

    def path_value(self, key: str, default: str | None = None) -> Path:
        """A path; a relative one resolves against the config file's directory."""
        return self.resolve(self.text(key, default))

    def resolve(self, value: str) -> Path:
        p = Path(value)
        return p if p.is_absolute() else self.path.parent / p

    def integer(self, key: str, default: int, low: int, high: int) -> int:
        value = self.raw.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise self.fail(key, f"must be an integer from {low} to {high}, got {value!r}")
        return value

    def number(self, key: str, default: float, low: float, high: float) -> float:
        value = self.raw.get(key, default)
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not low <= value <= high
        ):
            raise self.fail(
                key, f"must be a number from {_show(low)} to {_show(high)}, got {value!r}"
            )
        return float(value)

    def flag(self, key: str, default: bool = False) -> bool:
        value = self.raw.get(key, default)
        if not isinstance(value, bool):
            raise self.fail(key, f"must be true or false, got {value!r}")
        return value

    def strings(self, key: str, default: Iterable[str], *, hint: str) -> tuple[str, ...]:
        """A list of non-empty strings; ``hint`` shows an example."""
        value = self.raw.get(key, list(default))
        if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
            raise self.fail(key, f"must be a list of non-empty strings, e.g. {hint}")
        return tuple(value)


def _show(x: float) -> str:
    return str(int(x)) if x == int(x) else str(x)
