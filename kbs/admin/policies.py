"""The operator's policy changes: ``policy set`` (raw PCR values), ``learn``, ``allow``,
``apply``, ``assign``/``unassign``. Each validates its input, changes the database in one
transaction (which refuses a policy that no node could pass together with another it is held
to, ``kbs.policy.merge``) and writes one audit record naming the operator and what changed.
A change that allows more approves the newly allowed boot states for every node it concerns, in
the same transaction (``kbs.approvals.widen``; the node it was taken from is the canary).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime

from kbs.approvals.widen import Canary, widened, widening_pushes
from kbs.errors import NotFound, OperatorError
from kbs.model import Node, Policy, check_name, format_selector
from kbs.policy import learn, policyfile
from kbs.policy.learn import DiffRow, change_lines
from kbs.policy.rules import Document, check_bank
from kbs.signing import SigningKeys
from kbs.store import Store
from keylease.eventlog.bootstate import is_component_name

__all__ = ["PolicyAdmin", "PolicyChange"]


@dataclass(frozen=True)
class PolicyChange:
    """A policy after a change, and what changed (empty: nothing)."""

    policy: Policy
    changes: tuple[str, ...]


@dataclass(frozen=True)
class PolicyAdmin:
    store: Store
    actor: str
    clock: Callable[[], datetime]
    signing: Callable[[], SigningKeys]

    def _put(
        self,
        name: str,
        document: Document,
        selectors: Sequence[Mapping[str, str]] | None = None,
        canary: Node | None = None,
    ) -> tuple[Policy | None, Policy]:
        """Write the policy, with the approvals it gives if it allows more than before."""
        try:
            before: Policy | None = self.store.get_policy(name)
        except NotFound:
            before = None
        pushes = {}
        if before is not None:
            wanted = tuple(selectors) if selectors is not None else before.selectors
            after = Policy(name, document, wanted)
            boot = self.store.boot_record(canary.name) if canary is not None else None
            witness = Canary(canary, boot) if canary is not None else None
            if widened(before.document, document):
                pushes = widening_pushes(
                    self.store, self.signing(), before, after, witness, self.clock()
                )
        return self.store.put_policy(name, document, self.clock(), selectors, pushes)

    def _audit(self, event: str, detail: str, node: str | None = None) -> None:
        self.store.audit(
            actor=self.actor,
            event=event,
            node=node,
            result="ok",
            detail=detail[:1000],
            now=self.clock(),
        )

    def _node(self, name: str) -> Node:
        node = self.store.get_node(name)
        if node is None:
            raise NotFound(f"no node named {name!r}; `keylease-kbs node list` shows the nodes")
        return node

    def set_from_node(
        self, name: str, pcrs: Sequence[int], node_name: str | None, bank: str = "sha256"
    ) -> Policy:
        """A policy of raw PCR values (``pcr.N``) from the node's last verified attestation."""
        check_name(name, "policy")
        check_bank(bank)
        if not pcrs:
            raise OperatorError("a policy needs at least one PCR; empty policy means deny")
        if node_name is None:
            raise OperatorError(
                "policy set needs --from-node NODE: reference values are taken only from a "
                "node's last verified attestation (boot a reference node with the approved "
                "image, let its agent attest, then pass its name)"
            )
        node = self._node(node_name)
        empty = Policy(name, Document(bank, ()), ())
        components = [f"pcr.{i}" for i in sorted(pcrs)]
        document = learn.allow(empty, node, None, components, self.clock())
        _, policy = self._put(name, document, canary=node)
        when = node.last_attested_at.isoformat() if node.last_attested_at else "-"
        self._audit(
            "policy-set",
            f"policy {name} {bank} pcrs {','.join(str(i) for i in sorted(pcrs))} from node "
            f"{node.name} attested at {when}",
            node.name,
        )
        return policy

    def learn(
        self, name: str, node_name: str, bank: str = "sha256", pcrs: Sequence[int] = ()
    ) -> PolicyChange:
        """The node's last verified boot becomes policy ``name`` (replacing its document; its
        assignments are kept)."""
        check_name(name, "policy")
        check_bank(bank)
        node = self._node(node_name)
        document = learn.learn(node, self.store.boot_record(node.name), bank, pcrs, self.clock())
        before, policy = self._put(name, document, canary=node)
        changes = tuple(change_lines(before, policy, selectors_given=False))
        self._audit(
            "policy-learn",
            f"policy {name} {bank}: {len(document.rules)} component(s) from node {node.name} "
            f"({', '.join(r.component for r in document.rules)})",
            node.name,
        )
        return PolicyChange(policy, changes)

    def allow(self, name: str, node_name: str, components: Sequence[str] = ()) -> PolicyChange:
        """Add to policy ``name`` the values node ``node_name`` shows (for ``components``, or
        every component the policy names)."""
        check_name(name, "policy")
        for component in components:
            if not is_component_name(component):
                raise OperatorError(
                    f"unknown component {component[:80]!r}; `keylease-kbs policy diff {name} "
                    f"--node {node_name}` lists the node's components"
                )
        policy = self.store.get_policy(name)
        node = self._node(node_name)
        boot = self.store.boot_record(node.name)
        document = learn.allow(policy, node, boot, components, self.clock())
        if document == policy.document:
            return PolicyChange(policy, ())
        before, after = self._put(name, document, canary=node)
        changes = tuple(change_lines(before, after, selectors_given=False))
        self._audit(
            "policy-allow", f"policy {name} from node {node.name}: " + "; ".join(changes), node.name
        )
        return PolicyChange(after, changes)

    def apply(self, data: bytes, source: str) -> PolicyChange:
        """Make the policy the file describes exactly that (idempotent)."""
        parsed = policyfile.parse(data, source)
        try:
            current: Policy | None = self.store.get_policy(parsed.name)
        except NotFound:
            current = None
        selectors_given = parsed.selectors is not None
        wanted = Policy(
            parsed.name,
            parsed.document,
            parsed.selectors
            if parsed.selectors is not None
            else (current.selectors if current else ()),
        )
        if current is not None and not change_lines(current, wanted, selectors_given):
            return PolicyChange(current, ())
        before, after = self._put(parsed.name, parsed.document, parsed.selectors)
        changes = tuple(change_lines(before, after, selectors_given))
        self._audit("policy-apply", f"policy {parsed.name} from {source}: " + "; ".join(changes))
        return PolicyChange(after, changes)

    def diff(self, name: str, node_name: str) -> list[DiffRow]:
        policy = self.store.get_policy(name)
        node = self._node(node_name)
        return learn.diff(policy, node, self.store.boot_record(node.name))

    def assign(self, name: str, selector: Mapping[str, str]) -> Policy:
        check_name(name, "policy")
        policy = self.store.assign_policy(name, selector, self.clock())
        self._audit("policy-assign", f"policy {name} to {format_selector(selector)}")
        return policy

    def unassign(self, name: str, selector: Mapping[str, str]) -> None:
        check_name(name, "policy")
        self.store.unassign_policy(name, selector, self.clock())
        self._audit("policy-unassign", f"policy {name} from {format_selector(selector)}")
