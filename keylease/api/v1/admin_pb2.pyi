from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class AdminEmpty(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class AdminNodeRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class AdminApproveRequest(_message.Message):
    __slots__ = ("name", "labels")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    name: str
    labels: _containers.ScalarMap[str, str]
    def __init__(self, name: _Optional[str] = ..., labels: _Optional[_Mapping[str, str]] = ...) -> None: ...

class AdminNode(_message.Message):
    __slots__ = ("name", "state", "labels", "ek_hash", "metadata", "enrolled_at_us", "last_attested_at_us", "reset_count", "restart_count", "pcr_banks", "boot_log_digest", "last_denial", "last_denial_at_us")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    class MetadataEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    EK_HASH_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    ENROLLED_AT_US_FIELD_NUMBER: _ClassVar[int]
    LAST_ATTESTED_AT_US_FIELD_NUMBER: _ClassVar[int]
    RESET_COUNT_FIELD_NUMBER: _ClassVar[int]
    RESTART_COUNT_FIELD_NUMBER: _ClassVar[int]
    PCR_BANKS_FIELD_NUMBER: _ClassVar[int]
    BOOT_LOG_DIGEST_FIELD_NUMBER: _ClassVar[int]
    LAST_DENIAL_FIELD_NUMBER: _ClassVar[int]
    LAST_DENIAL_AT_US_FIELD_NUMBER: _ClassVar[int]
    name: str
    state: str
    labels: _containers.ScalarMap[str, str]
    ek_hash: str
    metadata: _containers.ScalarMap[str, str]
    enrolled_at_us: int
    last_attested_at_us: int
    reset_count: int
    restart_count: int
    pcr_banks: _containers.RepeatedCompositeFieldContainer[AdminPcrBank]
    boot_log_digest: str
    last_denial: str
    last_denial_at_us: int
    def __init__(self, name: _Optional[str] = ..., state: _Optional[str] = ..., labels: _Optional[_Mapping[str, str]] = ..., ek_hash: _Optional[str] = ..., metadata: _Optional[_Mapping[str, str]] = ..., enrolled_at_us: _Optional[int] = ..., last_attested_at_us: _Optional[int] = ..., reset_count: _Optional[int] = ..., restart_count: _Optional[int] = ..., pcr_banks: _Optional[_Iterable[_Union[AdminPcrBank, _Mapping]]] = ..., boot_log_digest: _Optional[str] = ..., last_denial: _Optional[str] = ..., last_denial_at_us: _Optional[int] = ...) -> None: ...

class AdminPcrBank(_message.Message):
    __slots__ = ("bank", "pcrs")
    class PcrsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: int
        value: bytes
        def __init__(self, key: _Optional[int] = ..., value: _Optional[bytes] = ...) -> None: ...
    BANK_FIELD_NUMBER: _ClassVar[int]
    PCRS_FIELD_NUMBER: _ClassVar[int]
    bank: str
    pcrs: _containers.ScalarMap[int, bytes]
    def __init__(self, bank: _Optional[str] = ..., pcrs: _Optional[_Mapping[int, bytes]] = ...) -> None: ...

class AdminBootComponent(_message.Message):
    __slots__ = ("name", "pcrs", "value", "summary", "entries")
    NAME_FIELD_NUMBER: _ClassVar[int]
    PCRS_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    SUMMARY_FIELD_NUMBER: _ClassVar[int]
    ENTRIES_FIELD_NUMBER: _ClassVar[int]
    name: str
    pcrs: _containers.RepeatedScalarFieldContainer[int]
    value: str
    summary: str
    entries: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, name: _Optional[str] = ..., pcrs: _Optional[_Iterable[int]] = ..., value: _Optional[str] = ..., summary: _Optional[str] = ..., entries: _Optional[_Iterable[str]] = ...) -> None: ...

class AdminBootState(_message.Message):
    __slots__ = ("bank", "components", "touched")
    BANK_FIELD_NUMBER: _ClassVar[int]
    COMPONENTS_FIELD_NUMBER: _ClassVar[int]
    TOUCHED_FIELD_NUMBER: _ClassVar[int]
    bank: str
    components: _containers.RepeatedCompositeFieldContainer[AdminBootComponent]
    touched: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, bank: _Optional[str] = ..., components: _Optional[_Iterable[_Union[AdminBootComponent, _Mapping]]] = ..., touched: _Optional[_Iterable[int]] = ...) -> None: ...

class AdminBootRecord(_message.Message):
    __slots__ = ("present", "log_digest", "recorded_at_us", "states")
    PRESENT_FIELD_NUMBER: _ClassVar[int]
    LOG_DIGEST_FIELD_NUMBER: _ClassVar[int]
    RECORDED_AT_US_FIELD_NUMBER: _ClassVar[int]
    STATES_FIELD_NUMBER: _ClassVar[int]
    present: bool
    log_digest: str
    recorded_at_us: int
    states: _containers.RepeatedCompositeFieldContainer[AdminBootState]
    def __init__(self, present: _Optional[bool] = ..., log_digest: _Optional[str] = ..., recorded_at_us: _Optional[int] = ..., states: _Optional[_Iterable[_Union[AdminBootState, _Mapping]]] = ...) -> None: ...

class AdminNodeList(_message.Message):
    __slots__ = ("nodes",)
    NODES_FIELD_NUMBER: _ClassVar[int]
    nodes: _containers.RepeatedCompositeFieldContainer[AdminNode]
    def __init__(self, nodes: _Optional[_Iterable[_Union[AdminNode, _Mapping]]] = ...) -> None: ...

class AdminAllowEkRequest(_message.Message):
    __slots__ = ("ek_hash",)
    EK_HASH_FIELD_NUMBER: _ClassVar[int]
    ek_hash: str
    def __init__(self, ek_hash: _Optional[str] = ...) -> None: ...

class AdminAllowEkResponse(_message.Message):
    __slots__ = ("added",)
    ADDED_FIELD_NUMBER: _ClassVar[int]
    added: bool
    def __init__(self, added: _Optional[bool] = ...) -> None: ...

class AdminAllowlistEntry(_message.Message):
    __slots__ = ("ek_hash", "added_at_us")
    EK_HASH_FIELD_NUMBER: _ClassVar[int]
    ADDED_AT_US_FIELD_NUMBER: _ClassVar[int]
    ek_hash: str
    added_at_us: int
    def __init__(self, ek_hash: _Optional[str] = ..., added_at_us: _Optional[int] = ...) -> None: ...

class AdminAllowlist(_message.Message):
    __slots__ = ("entries",)
    ENTRIES_FIELD_NUMBER: _ClassVar[int]
    entries: _containers.RepeatedCompositeFieldContainer[AdminAllowlistEntry]
    def __init__(self, entries: _Optional[_Iterable[_Union[AdminAllowlistEntry, _Mapping]]] = ...) -> None: ...

class AdminKeyMaterial(_message.Message):
    __slots__ = ("name", "private_key", "source")
    NAME_FIELD_NUMBER: _ClassVar[int]
    PRIVATE_KEY_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    name: str
    private_key: bytes
    source: str
    def __init__(self, name: _Optional[str] = ..., private_key: _Optional[bytes] = ..., source: _Optional[str] = ...) -> None: ...

class AdminKeyName(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class AdminKey(_message.Message):
    __slots__ = ("name", "version", "algorithm", "created_at_us", "state", "retired_at_us")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    ALGORITHM_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_US_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    RETIRED_AT_US_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: int
    algorithm: str
    created_at_us: int
    state: str
    retired_at_us: int
    def __init__(self, name: _Optional[str] = ..., version: _Optional[int] = ..., algorithm: _Optional[str] = ..., created_at_us: _Optional[int] = ..., state: _Optional[str] = ..., retired_at_us: _Optional[int] = ...) -> None: ...

class AdminRetireKeyRequest(_message.Message):
    __slots__ = ("name", "version")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: int
    def __init__(self, name: _Optional[str] = ..., version: _Optional[int] = ...) -> None: ...

class AdminRetireKeyResponse(_message.Message):
    __slots__ = ("key", "nodes_notified")
    KEY_FIELD_NUMBER: _ClassVar[int]
    NODES_NOTIFIED_FIELD_NUMBER: _ClassVar[int]
    key: AdminKey
    nodes_notified: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, key: _Optional[_Union[AdminKey, _Mapping]] = ..., nodes_notified: _Optional[_Iterable[str]] = ...) -> None: ...

class AdminKeyHolder(_message.Message):
    __slots__ = ("node", "versions", "released_at_us", "lease_until_us")
    NODE_FIELD_NUMBER: _ClassVar[int]
    VERSIONS_FIELD_NUMBER: _ClassVar[int]
    RELEASED_AT_US_FIELD_NUMBER: _ClassVar[int]
    LEASE_UNTIL_US_FIELD_NUMBER: _ClassVar[int]
    node: str
    versions: _containers.RepeatedScalarFieldContainer[int]
    released_at_us: int
    lease_until_us: int
    def __init__(self, node: _Optional[str] = ..., versions: _Optional[_Iterable[int]] = ..., released_at_us: _Optional[int] = ..., lease_until_us: _Optional[int] = ...) -> None: ...

class AdminKeyDetails(_message.Message):
    __slots__ = ("name", "versions", "grants", "holders")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSIONS_FIELD_NUMBER: _ClassVar[int]
    GRANTS_FIELD_NUMBER: _ClassVar[int]
    HOLDERS_FIELD_NUMBER: _ClassVar[int]
    name: str
    versions: _containers.RepeatedCompositeFieldContainer[AdminKey]
    grants: _containers.RepeatedCompositeFieldContainer[AdminSelector]
    holders: _containers.RepeatedCompositeFieldContainer[AdminKeyHolder]
    def __init__(self, name: _Optional[str] = ..., versions: _Optional[_Iterable[_Union[AdminKey, _Mapping]]] = ..., grants: _Optional[_Iterable[_Union[AdminSelector, _Mapping]]] = ..., holders: _Optional[_Iterable[_Union[AdminKeyHolder, _Mapping]]] = ...) -> None: ...

class AdminKeyList(_message.Message):
    __slots__ = ("keys",)
    KEYS_FIELD_NUMBER: _ClassVar[int]
    keys: _containers.RepeatedCompositeFieldContainer[AdminKey]
    def __init__(self, keys: _Optional[_Iterable[_Union[AdminKey, _Mapping]]] = ...) -> None: ...

class AdminDeleteKeyResponse(_message.Message):
    __slots__ = ("versions", "grants", "nodes_notified")
    VERSIONS_FIELD_NUMBER: _ClassVar[int]
    GRANTS_FIELD_NUMBER: _ClassVar[int]
    NODES_NOTIFIED_FIELD_NUMBER: _ClassVar[int]
    versions: int
    grants: int
    nodes_notified: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, versions: _Optional[int] = ..., grants: _Optional[int] = ..., nodes_notified: _Optional[_Iterable[str]] = ...) -> None: ...

class AdminGrantRequest(_message.Message):
    __slots__ = ("key", "selector")
    class SelectorEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    KEY_FIELD_NUMBER: _ClassVar[int]
    SELECTOR_FIELD_NUMBER: _ClassVar[int]
    key: str
    selector: _containers.ScalarMap[str, str]
    def __init__(self, key: _Optional[str] = ..., selector: _Optional[_Mapping[str, str]] = ...) -> None: ...

class AdminGrant(_message.Message):
    __slots__ = ("key", "selector", "created_at_us")
    class SelectorEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    KEY_FIELD_NUMBER: _ClassVar[int]
    SELECTOR_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_US_FIELD_NUMBER: _ClassVar[int]
    key: str
    selector: _containers.ScalarMap[str, str]
    created_at_us: int
    def __init__(self, key: _Optional[str] = ..., selector: _Optional[_Mapping[str, str]] = ..., created_at_us: _Optional[int] = ...) -> None: ...

class AdminGrantList(_message.Message):
    __slots__ = ("grants",)
    GRANTS_FIELD_NUMBER: _ClassVar[int]
    grants: _containers.RepeatedCompositeFieldContainer[AdminGrant]
    def __init__(self, grants: _Optional[_Iterable[_Union[AdminGrant, _Mapping]]] = ...) -> None: ...

class AdminSelector(_message.Message):
    __slots__ = ("pairs",)
    class PairsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    PAIRS_FIELD_NUMBER: _ClassVar[int]
    pairs: _containers.ScalarMap[str, str]
    def __init__(self, pairs: _Optional[_Mapping[str, str]] = ...) -> None: ...

class AdminSetPolicyRequest(_message.Message):
    __slots__ = ("name", "pcrs", "from_node", "bank")
    NAME_FIELD_NUMBER: _ClassVar[int]
    PCRS_FIELD_NUMBER: _ClassVar[int]
    FROM_NODE_FIELD_NUMBER: _ClassVar[int]
    BANK_FIELD_NUMBER: _ClassVar[int]
    name: str
    pcrs: _containers.RepeatedScalarFieldContainer[int]
    from_node: str
    bank: str
    def __init__(self, name: _Optional[str] = ..., pcrs: _Optional[_Iterable[int]] = ..., from_node: _Optional[str] = ..., bank: _Optional[str] = ...) -> None: ...

class AdminAssignPolicyRequest(_message.Message):
    __slots__ = ("name", "selector")
    class SelectorEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    SELECTOR_FIELD_NUMBER: _ClassVar[int]
    name: str
    selector: _containers.ScalarMap[str, str]
    def __init__(self, name: _Optional[str] = ..., selector: _Optional[_Mapping[str, str]] = ...) -> None: ...

class AdminAllowedValue(_message.Message):
    __slots__ = ("value", "note")
    VALUE_FIELD_NUMBER: _ClassVar[int]
    NOTE_FIELD_NUMBER: _ClassVar[int]
    value: str
    note: str
    def __init__(self, value: _Optional[str] = ..., note: _Optional[str] = ...) -> None: ...

class AdminPolicyRule(_message.Message):
    __slots__ = ("component", "allowed", "contains")
    COMPONENT_FIELD_NUMBER: _ClassVar[int]
    ALLOWED_FIELD_NUMBER: _ClassVar[int]
    CONTAINS_FIELD_NUMBER: _ClassVar[int]
    component: str
    allowed: _containers.RepeatedCompositeFieldContainer[AdminAllowedValue]
    contains: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, component: _Optional[str] = ..., allowed: _Optional[_Iterable[_Union[AdminAllowedValue, _Mapping]]] = ..., contains: _Optional[_Iterable[str]] = ...) -> None: ...

class AdminPolicy(_message.Message):
    __slots__ = ("name", "pcr_bank", "selectors", "rules")
    NAME_FIELD_NUMBER: _ClassVar[int]
    PCR_BANK_FIELD_NUMBER: _ClassVar[int]
    SELECTORS_FIELD_NUMBER: _ClassVar[int]
    RULES_FIELD_NUMBER: _ClassVar[int]
    name: str
    pcr_bank: str
    selectors: _containers.RepeatedCompositeFieldContainer[AdminSelector]
    rules: _containers.RepeatedCompositeFieldContainer[AdminPolicyRule]
    def __init__(self, name: _Optional[str] = ..., pcr_bank: _Optional[str] = ..., selectors: _Optional[_Iterable[_Union[AdminSelector, _Mapping]]] = ..., rules: _Optional[_Iterable[_Union[AdminPolicyRule, _Mapping]]] = ...) -> None: ...

class AdminPolicyName(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class AdminLearnPolicyRequest(_message.Message):
    __slots__ = ("name", "from_node", "bank", "pcrs")
    NAME_FIELD_NUMBER: _ClassVar[int]
    FROM_NODE_FIELD_NUMBER: _ClassVar[int]
    BANK_FIELD_NUMBER: _ClassVar[int]
    PCRS_FIELD_NUMBER: _ClassVar[int]
    name: str
    from_node: str
    bank: str
    pcrs: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, name: _Optional[str] = ..., from_node: _Optional[str] = ..., bank: _Optional[str] = ..., pcrs: _Optional[_Iterable[int]] = ...) -> None: ...

class AdminAllowPolicyRequest(_message.Message):
    __slots__ = ("name", "from_node", "components")
    NAME_FIELD_NUMBER: _ClassVar[int]
    FROM_NODE_FIELD_NUMBER: _ClassVar[int]
    COMPONENTS_FIELD_NUMBER: _ClassVar[int]
    name: str
    from_node: str
    components: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, name: _Optional[str] = ..., from_node: _Optional[str] = ..., components: _Optional[_Iterable[str]] = ...) -> None: ...

class AdminApplyPolicyRequest(_message.Message):
    __slots__ = ("document", "source")
    DOCUMENT_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    document: bytes
    source: str
    def __init__(self, document: _Optional[bytes] = ..., source: _Optional[str] = ...) -> None: ...

class AdminPolicyChange(_message.Message):
    __slots__ = ("policy", "changes")
    POLICY_FIELD_NUMBER: _ClassVar[int]
    CHANGES_FIELD_NUMBER: _ClassVar[int]
    policy: AdminPolicy
    changes: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, policy: _Optional[_Union[AdminPolicy, _Mapping]] = ..., changes: _Optional[_Iterable[str]] = ...) -> None: ...

class AdminDiffPolicyRequest(_message.Message):
    __slots__ = ("name", "node")
    NAME_FIELD_NUMBER: _ClassVar[int]
    NODE_FIELD_NUMBER: _ClassVar[int]
    name: str
    node: str
    def __init__(self, name: _Optional[str] = ..., node: _Optional[str] = ...) -> None: ...

class AdminDiffRow(_message.Message):
    __slots__ = ("component", "pcrs", "node_value", "node_summary", "result", "allowed")
    COMPONENT_FIELD_NUMBER: _ClassVar[int]
    PCRS_FIELD_NUMBER: _ClassVar[int]
    NODE_VALUE_FIELD_NUMBER: _ClassVar[int]
    NODE_SUMMARY_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    ALLOWED_FIELD_NUMBER: _ClassVar[int]
    component: str
    pcrs: _containers.RepeatedScalarFieldContainer[int]
    node_value: str
    node_summary: str
    result: str
    allowed: str
    def __init__(self, component: _Optional[str] = ..., pcrs: _Optional[_Iterable[int]] = ..., node_value: _Optional[str] = ..., node_summary: _Optional[str] = ..., result: _Optional[str] = ..., allowed: _Optional[str] = ...) -> None: ...

class AdminPolicyDiff(_message.Message):
    __slots__ = ("rows",)
    ROWS_FIELD_NUMBER: _ClassVar[int]
    rows: _containers.RepeatedCompositeFieldContainer[AdminDiffRow]
    def __init__(self, rows: _Optional[_Iterable[_Union[AdminDiffRow, _Mapping]]] = ...) -> None: ...

class AdminPolicyList(_message.Message):
    __slots__ = ("policies",)
    POLICIES_FIELD_NUMBER: _ClassVar[int]
    policies: _containers.RepeatedCompositeFieldContainer[AdminPolicy]
    def __init__(self, policies: _Optional[_Iterable[_Union[AdminPolicy, _Mapping]]] = ...) -> None: ...

class AdminAuditRequest(_message.Message):
    __slots__ = ("node", "limit")
    NODE_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    node: str
    limit: int
    def __init__(self, node: _Optional[str] = ..., limit: _Optional[int] = ...) -> None: ...

class AdminAuditEntry(_message.Message):
    __slots__ = ("id", "at_us", "actor", "event", "node", "result", "detail")
    ID_FIELD_NUMBER: _ClassVar[int]
    AT_US_FIELD_NUMBER: _ClassVar[int]
    ACTOR_FIELD_NUMBER: _ClassVar[int]
    EVENT_FIELD_NUMBER: _ClassVar[int]
    NODE_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    id: int
    at_us: int
    actor: str
    event: str
    node: str
    result: str
    detail: str
    def __init__(self, id: _Optional[int] = ..., at_us: _Optional[int] = ..., actor: _Optional[str] = ..., event: _Optional[str] = ..., node: _Optional[str] = ..., result: _Optional[str] = ..., detail: _Optional[str] = ...) -> None: ...

class AdminAuditList(_message.Message):
    __slots__ = ("entries",)
    ENTRIES_FIELD_NUMBER: _ClassVar[int]
    entries: _containers.RepeatedCompositeFieldContainer[AdminAuditEntry]
    def __init__(self, entries: _Optional[_Iterable[_Union[AdminAuditEntry, _Mapping]]] = ...) -> None: ...
