"""Approvals (issue 11): the boot states whose PCR values may open a node's sealed releases.

A release is sealed with PolicyAuthorize to the broker's release-signing key for one node and
policy group (``keylease.api.v1.tpmpolicy``); it opens only under an approval the broker signed
(``keylease.api.v1.approvals``), for the PCR values the node's TPM holds, before a limit in the
node's TPM clock. Here:

- ``states``: approved states, whether a node's policies allow one, and signing an approval;
- ``release``: what each release carries: the state just verified, and the node's other states
  its policies still allow, signed anew (limit: the quote's TPM clock + ``approval_ttl_seconds``);
- ``widen``: a policy that allows more approves, for every node it concerns, the canary's state
  and the states predicted from the node's own boot log (``predict``), pushed on the watch stream.
"""
