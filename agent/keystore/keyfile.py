"""How a key version is named on disk: ``<name>.v<version>.pem``, one file per version.

The broker releases every version of a key that is not retired, so that images encrypted to an
older version keep pulling; each gets a file of its own. The mapping is one to one: a key name
is 1-63 characters of ``A-Za-z0-9._-`` starting with a letter or digit (it may itself contain
``.v2``), and the version is the *last* ``.v<digits>`` before ``.pem``, written without leading
zeros, so ``a.v1.v3.pem`` is key ``a.v1`` version 3 and no two (name, version) pairs share a
file. Names never start with a dot (ctd-decoder reads hidden files too) and never hold a colon
(skopeo and podman split ``--decryption-key FILE:PASSWORD`` on it).

Files of the form ``<name>.pem`` were written by agents before key versions had files of their
own; ``parse_key_file`` recognises them (version None) so that a sync replaces them.
"""

from __future__ import annotations

import re

from agent.errors import InvalidKey

__all__ = ["MAX_KEY_VERSION", "key_file_name", "parse_key_file", "validate_version"]

MAX_KEY_VERSION = 2**32 - 1  # the release's uint32
_NAME = r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}"
_VERSIONED = re.compile(rf"(?P<name>{_NAME})\.v(?P<version>[1-9][0-9]{{0,9}})\.pem")
_UNVERSIONED = re.compile(rf"(?P<name>{_NAME})\.pem")


def validate_version(name: str, version: int) -> None:
    """Raise InvalidKey unless ``version`` is a key version (1 or more)."""
    if not 1 <= version <= MAX_KEY_VERSION:
        raise InvalidKey(f"key {name[:80]!r} has version {version}; versions start at 1")


def key_file_name(name: str, version: int) -> str:
    """``<name>.v<version>.pem`` (the name must already be valid: ``validate_key_name``)."""
    return f"{name}.v{version}.pem"


def parse_key_file(entry: str) -> tuple[str, int | None] | None:
    """(name, version) of a key file this agent writes, (name, None) of one written before
    versions had files, None for anything else."""
    if match := _VERSIONED.fullmatch(entry):
        return match["name"], int(match["version"])
    if match := _UNVERSIONED.fullmatch(entry):
        return match["name"], None
    return None
