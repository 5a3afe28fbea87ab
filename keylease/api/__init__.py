"""The versioned wire contracts; ``v1`` is the only one."""
