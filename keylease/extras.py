"""Each program is a pip extra; started without it, it says which one to install."""

from __future__ import annotations

import importlib.util

__all__ = ["missing_extra"]


def missing_extra(program: str, extra: str, modules: tuple[str, ...]) -> str | None:
    """The message for an install that lacks ``extra``, or None when every module is there.

    Only looks the modules up (no import), so it costs a few file-system lookups at start-up.
    """
    absent = [m for m in modules if importlib.util.find_spec(m) is None]
    if not absent:
        return None
    return (
        f"{program}: this installation lacks the '{extra}' extra (missing: {', '.join(absent)}); "
        f"install it with: pip install 'keylease[{extra}]'"
    )
