"""keylease-kbs: the key broker service."""
