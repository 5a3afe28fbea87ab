"""Attestation policies: named sets of allowed values per boot component.

``rules`` is the policy document (components, allowed values, ``contains`` sets) and its
validation; ``evaluate`` decides an attestation and writes the denial text; ``merge`` finds
policies that no node could satisfy together; ``learn`` builds and widens policies from a node's
recorded boot state and compares them (``policy diff``); ``policyfile`` is the reviewable TOML
form (``policy export`` / ``policy apply``). This package imports nothing at import time, so
``kbs.model`` can use ``rules`` without a cycle.
"""
