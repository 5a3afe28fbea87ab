"""keylease-agent: the node agent."""
