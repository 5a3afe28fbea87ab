"""The node's image keys: in the runtimes' key directories, and sealed at rest.

- ``keydir``: one runtime key directory (``<root>/keylease/*.pem``), synced atomically;
- ``keyfile``: a key version's file name, ``<name>.v<version>.pem``;
- ``dirfd``, ``staging``: its directory-fd primitives, and the fallback for filesystems without
  ``O_TMPFILE``;
- ``install``: every configured key directory at once (tmpfs checked), and removal;
- ``cache``: the sealed release cache in the state directory, and which PCR changed;
- ``approvals``: the broker's approvals that open it, in the state directory;
- ``ocikey``: a key is installed only if ocicrypt will parse it;
- ``memfs``: is a key directory memory-backed?
"""

from agent.keystore.approvals import ApprovalStore
from agent.keystore.cache import PcrReader, SealedCache
from agent.keystore.install import (
    clear_key_directories,
    install_keys,
    key_directories,
    remove_all_keys,
)
from agent.keystore.keydir import OWNED_DIR, InstallableKey, KeyDirectory, SyncResult
from agent.keystore.keyfile import key_file_name, parse_key_file
from agent.keystore.ocikey import validate_private_key_pem

__all__ = [
    "OWNED_DIR",
    "ApprovalStore",
    "InstallableKey",
    "KeyDirectory",
    "PcrReader",
    "SealedCache",
    "SyncResult",
    "clear_key_directories",
    "install_keys",
    "key_directories",
    "key_file_name",
    "parse_key_file",
    "remove_all_keys",
    "validate_private_key_pem",
]
