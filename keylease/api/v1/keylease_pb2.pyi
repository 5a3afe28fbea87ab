from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class NodeState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    NODE_STATE_UNSPECIFIED: _ClassVar[NodeState]
    NODE_STATE_PENDING: _ClassVar[NodeState]
    NODE_STATE_APPROVED: _ClassVar[NodeState]
    NODE_STATE_REVOKED: _ClassVar[NodeState]

class AttestOutcome(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ATTEST_OUTCOME_UNSPECIFIED: _ClassVar[AttestOutcome]
    ATTEST_OUTCOME_PENDING_APPROVAL: _ClassVar[AttestOutcome]
    ATTEST_OUTCOME_RELEASED: _ClassVar[AttestOutcome]

class WatchKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    WATCH_KIND_UNSPECIFIED: _ClassVar[WatchKind]
    WATCH_KIND_REVOKED: _ClassVar[WatchKind]
    WATCH_KIND_CHANGED: _ClassVar[WatchKind]
    WATCH_KIND_HEARTBEAT: _ClassVar[WatchKind]
NODE_STATE_UNSPECIFIED: NodeState
NODE_STATE_PENDING: NodeState
NODE_STATE_APPROVED: NodeState
NODE_STATE_REVOKED: NodeState
ATTEST_OUTCOME_UNSPECIFIED: AttestOutcome
ATTEST_OUTCOME_PENDING_APPROVAL: AttestOutcome
ATTEST_OUTCOME_RELEASED: AttestOutcome
WATCH_KIND_UNSPECIFIED: WatchKind
WATCH_KIND_REVOKED: WatchKind
WATCH_KIND_CHANGED: WatchKind
WATCH_KIND_HEARTBEAT: WatchKind

class StartEnrollmentRequest(_message.Message):
    __slots__ = ("node_name", "ek_certificate", "ek_public", "ak_public", "metadata")
    class MetadataEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    NODE_NAME_FIELD_NUMBER: _ClassVar[int]
    EK_CERTIFICATE_FIELD_NUMBER: _ClassVar[int]
    EK_PUBLIC_FIELD_NUMBER: _ClassVar[int]
    AK_PUBLIC_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    node_name: str
    ek_certificate: bytes
    ek_public: bytes
    ak_public: bytes
    metadata: _containers.ScalarMap[str, str]
    def __init__(self, node_name: _Optional[str] = ..., ek_certificate: _Optional[bytes] = ..., ek_public: _Optional[bytes] = ..., ak_public: _Optional[bytes] = ..., metadata: _Optional[_Mapping[str, str]] = ...) -> None: ...

class StartEnrollmentResponse(_message.Message):
    __slots__ = ("enrollment_id", "credential_blob", "encrypted_secret")
    ENROLLMENT_ID_FIELD_NUMBER: _ClassVar[int]
    CREDENTIAL_BLOB_FIELD_NUMBER: _ClassVar[int]
    ENCRYPTED_SECRET_FIELD_NUMBER: _ClassVar[int]
    enrollment_id: str
    credential_blob: bytes
    encrypted_secret: bytes
    def __init__(self, enrollment_id: _Optional[str] = ..., credential_blob: _Optional[bytes] = ..., encrypted_secret: _Optional[bytes] = ...) -> None: ...

class FinishEnrollmentRequest(_message.Message):
    __slots__ = ("enrollment_id", "secret")
    ENROLLMENT_ID_FIELD_NUMBER: _ClassVar[int]
    SECRET_FIELD_NUMBER: _ClassVar[int]
    enrollment_id: str
    secret: bytes
    def __init__(self, enrollment_id: _Optional[str] = ..., secret: _Optional[bytes] = ...) -> None: ...

class FinishEnrollmentResponse(_message.Message):
    __slots__ = ("state",)
    STATE_FIELD_NUMBER: _ClassVar[int]
    state: NodeState
    def __init__(self, state: _Optional[_Union[NodeState, str]] = ...) -> None: ...

class GetNonceRequest(_message.Message):
    __slots__ = ("node_name",)
    NODE_NAME_FIELD_NUMBER: _ClassVar[int]
    node_name: str
    def __init__(self, node_name: _Optional[str] = ...) -> None: ...

class GetNonceResponse(_message.Message):
    __slots__ = ("nonce", "expires_at_unix")
    NONCE_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_UNIX_FIELD_NUMBER: _ClassVar[int]
    nonce: bytes
    expires_at_unix: int
    def __init__(self, nonce: _Optional[bytes] = ..., expires_at_unix: _Optional[int] = ...) -> None: ...

class PcrValue(_message.Message):
    __slots__ = ("index", "value")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    index: int
    value: bytes
    def __init__(self, index: _Optional[int] = ..., value: _Optional[bytes] = ...) -> None: ...

class PcrBank(_message.Message):
    __slots__ = ("bank", "pcrs")
    BANK_FIELD_NUMBER: _ClassVar[int]
    PCRS_FIELD_NUMBER: _ClassVar[int]
    bank: str
    pcrs: _containers.RepeatedCompositeFieldContainer[PcrValue]
    def __init__(self, bank: _Optional[str] = ..., pcrs: _Optional[_Iterable[_Union[PcrValue, _Mapping]]] = ...) -> None: ...

class AttestRequest(_message.Message):
    __slots__ = ("node_name", "nonce", "quote", "signature", "event_log", "banks")
    NODE_NAME_FIELD_NUMBER: _ClassVar[int]
    NONCE_FIELD_NUMBER: _ClassVar[int]
    QUOTE_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    EVENT_LOG_FIELD_NUMBER: _ClassVar[int]
    BANKS_FIELD_NUMBER: _ClassVar[int]
    node_name: str
    nonce: bytes
    quote: bytes
    signature: bytes
    event_log: bytes
    banks: _containers.RepeatedCompositeFieldContainer[PcrBank]
    def __init__(self, node_name: _Optional[str] = ..., nonce: _Optional[bytes] = ..., quote: _Optional[bytes] = ..., signature: _Optional[bytes] = ..., event_log: _Optional[bytes] = ..., banks: _Optional[_Iterable[_Union[PcrBank, _Mapping]]] = ...) -> None: ...

class AttestResponse(_message.Message):
    __slots__ = ("outcome", "release")
    OUTCOME_FIELD_NUMBER: _ClassVar[int]
    RELEASE_FIELD_NUMBER: _ClassVar[int]
    outcome: AttestOutcome
    release: Release
    def __init__(self, outcome: _Optional[_Union[AttestOutcome, str]] = ..., release: _Optional[_Union[Release, _Mapping]] = ...) -> None: ...

class Release(_message.Message):
    __slots__ = ("duplicate", "in_sym_seed", "sealed_public", "pcr_bank", "pcr_indices", "bundle_nonce", "bundle_ciphertext", "node_name", "signing_certificate", "signature", "policy_group", "approvals")
    DUPLICATE_FIELD_NUMBER: _ClassVar[int]
    IN_SYM_SEED_FIELD_NUMBER: _ClassVar[int]
    SEALED_PUBLIC_FIELD_NUMBER: _ClassVar[int]
    PCR_BANK_FIELD_NUMBER: _ClassVar[int]
    PCR_INDICES_FIELD_NUMBER: _ClassVar[int]
    BUNDLE_NONCE_FIELD_NUMBER: _ClassVar[int]
    BUNDLE_CIPHERTEXT_FIELD_NUMBER: _ClassVar[int]
    NODE_NAME_FIELD_NUMBER: _ClassVar[int]
    SIGNING_CERTIFICATE_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    POLICY_GROUP_FIELD_NUMBER: _ClassVar[int]
    APPROVALS_FIELD_NUMBER: _ClassVar[int]
    duplicate: bytes
    in_sym_seed: bytes
    sealed_public: bytes
    pcr_bank: str
    pcr_indices: _containers.RepeatedScalarFieldContainer[int]
    bundle_nonce: bytes
    bundle_ciphertext: bytes
    node_name: str
    signing_certificate: bytes
    signature: bytes
    policy_group: str
    approvals: _containers.RepeatedCompositeFieldContainer[Approval]
    def __init__(self, duplicate: _Optional[bytes] = ..., in_sym_seed: _Optional[bytes] = ..., sealed_public: _Optional[bytes] = ..., pcr_bank: _Optional[str] = ..., pcr_indices: _Optional[_Iterable[int]] = ..., bundle_nonce: _Optional[bytes] = ..., bundle_ciphertext: _Optional[bytes] = ..., node_name: _Optional[str] = ..., signing_certificate: _Optional[bytes] = ..., signature: _Optional[bytes] = ..., policy_group: _Optional[str] = ..., approvals: _Optional[_Iterable[_Union[Approval, _Mapping]]] = ...) -> None: ...

class KeyBundle(_message.Message):
    __slots__ = ("node_name", "issued_at_unix", "not_after_unix", "keys", "lease_clock_limit")
    NODE_NAME_FIELD_NUMBER: _ClassVar[int]
    ISSUED_AT_UNIX_FIELD_NUMBER: _ClassVar[int]
    NOT_AFTER_UNIX_FIELD_NUMBER: _ClassVar[int]
    KEYS_FIELD_NUMBER: _ClassVar[int]
    LEASE_CLOCK_LIMIT_FIELD_NUMBER: _ClassVar[int]
    node_name: str
    issued_at_unix: int
    not_after_unix: int
    keys: _containers.RepeatedCompositeFieldContainer[BundledKey]
    lease_clock_limit: int
    def __init__(self, node_name: _Optional[str] = ..., issued_at_unix: _Optional[int] = ..., not_after_unix: _Optional[int] = ..., keys: _Optional[_Iterable[_Union[BundledKey, _Mapping]]] = ..., lease_clock_limit: _Optional[int] = ...) -> None: ...

class BundledKey(_message.Message):
    __slots__ = ("name", "version", "private_key_pem")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    PRIVATE_KEY_PEM_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: int
    private_key_pem: bytes
    def __init__(self, name: _Optional[str] = ..., version: _Optional[int] = ..., private_key_pem: _Optional[bytes] = ...) -> None: ...

class Approval(_message.Message):
    __slots__ = ("node_name", "policy_group", "pcr_bank", "pcrs", "clock_limit", "components", "origin", "issued_at_unix", "signing_certificate", "authorization", "signature")
    NODE_NAME_FIELD_NUMBER: _ClassVar[int]
    POLICY_GROUP_FIELD_NUMBER: _ClassVar[int]
    PCR_BANK_FIELD_NUMBER: _ClassVar[int]
    PCRS_FIELD_NUMBER: _ClassVar[int]
    CLOCK_LIMIT_FIELD_NUMBER: _ClassVar[int]
    COMPONENTS_FIELD_NUMBER: _ClassVar[int]
    ORIGIN_FIELD_NUMBER: _ClassVar[int]
    ISSUED_AT_UNIX_FIELD_NUMBER: _ClassVar[int]
    SIGNING_CERTIFICATE_FIELD_NUMBER: _ClassVar[int]
    AUTHORIZATION_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    node_name: str
    policy_group: str
    pcr_bank: str
    pcrs: _containers.RepeatedCompositeFieldContainer[PcrValue]
    clock_limit: int
    components: _containers.RepeatedCompositeFieldContainer[ApprovedComponent]
    origin: str
    issued_at_unix: int
    signing_certificate: bytes
    authorization: bytes
    signature: bytes
    def __init__(self, node_name: _Optional[str] = ..., policy_group: _Optional[str] = ..., pcr_bank: _Optional[str] = ..., pcrs: _Optional[_Iterable[_Union[PcrValue, _Mapping]]] = ..., clock_limit: _Optional[int] = ..., components: _Optional[_Iterable[_Union[ApprovedComponent, _Mapping]]] = ..., origin: _Optional[str] = ..., issued_at_unix: _Optional[int] = ..., signing_certificate: _Optional[bytes] = ..., authorization: _Optional[bytes] = ..., signature: _Optional[bytes] = ...) -> None: ...

class ApprovedComponent(_message.Message):
    __slots__ = ("name", "value", "summary")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    SUMMARY_FIELD_NUMBER: _ClassVar[int]
    name: str
    value: str
    summary: str
    def __init__(self, name: _Optional[str] = ..., value: _Optional[str] = ..., summary: _Optional[str] = ...) -> None: ...

class ApprovalList(_message.Message):
    __slots__ = ("approvals",)
    APPROVALS_FIELD_NUMBER: _ClassVar[int]
    approvals: _containers.RepeatedCompositeFieldContainer[Approval]
    def __init__(self, approvals: _Optional[_Iterable[_Union[Approval, _Mapping]]] = ...) -> None: ...

class WatchRequest(_message.Message):
    __slots__ = ("node_name",)
    NODE_NAME_FIELD_NUMBER: _ClassVar[int]
    node_name: str
    def __init__(self, node_name: _Optional[str] = ...) -> None: ...

class WatchEvent(_message.Message):
    __slots__ = ("kind", "reason", "approvals")
    KIND_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    APPROVALS_FIELD_NUMBER: _ClassVar[int]
    kind: WatchKind
    reason: str
    approvals: _containers.RepeatedCompositeFieldContainer[Approval]
    def __init__(self, kind: _Optional[_Union[WatchKind, str]] = ..., reason: _Optional[str] = ..., approvals: _Optional[_Iterable[_Union[Approval, _Mapping]]] = ...) -> None: ...
