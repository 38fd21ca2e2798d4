import datetime

from bksops.tasknode.v1 import json_value_pb2 as _json_value_pb2
from google.api import annotations_pb2 as _annotations_pb2
from google.protobuf import field_mask_pb2 as _field_mask_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.rpc import status_pb2 as _status_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class NodeView(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    NODE_VIEW_UNSPECIFIED: _ClassVar[NodeView]
    NODE_VIEW_BASIC: _ClassVar[NodeView]
    NODE_VIEW_FULL: _ClassVar[NodeView]

class Scope(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SCOPE_UNSPECIFIED: _ClassVar[Scope]
    SCOPE_CMDB_BIZ: _ClassVar[Scope]
    SCOPE_PROJECT: _ClassVar[Scope]

class NodeState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    NODE_STATE_UNSPECIFIED: _ClassVar[NodeState]
    NODE_STATE_CREATED: _ClassVar[NodeState]
    NODE_STATE_READY: _ClassVar[NodeState]
    NODE_STATE_LOOP_READY: _ClassVar[NodeState]
    NODE_STATE_RUNNING: _ClassVar[NodeState]
    NODE_STATE_SUSPENDED: _ClassVar[NodeState]
    NODE_STATE_NODE_SUSPENDED: _ClassVar[NodeState]
    NODE_STATE_BLOCKED: _ClassVar[NodeState]
    NODE_STATE_FINISHED: _ClassVar[NodeState]
    NODE_STATE_FAILED: _ClassVar[NodeState]
    NODE_STATE_REVOKED: _ClassVar[NodeState]
    NODE_STATE_EXPIRED: _ClassVar[NodeState]
    NODE_STATE_ROLLING_BACK: _ClassVar[NodeState]
    NODE_STATE_ROLL_BACK_SUCCESS: _ClassVar[NodeState]
    NODE_STATE_ROLL_BACK_FAILED: _ClassVar[NodeState]
NODE_VIEW_UNSPECIFIED: NodeView
NODE_VIEW_BASIC: NodeView
NODE_VIEW_FULL: NodeView
SCOPE_UNSPECIFIED: Scope
SCOPE_CMDB_BIZ: Scope
SCOPE_PROJECT: Scope
NODE_STATE_UNSPECIFIED: NodeState
NODE_STATE_CREATED: NodeState
NODE_STATE_READY: NodeState
NODE_STATE_LOOP_READY: NodeState
NODE_STATE_RUNNING: NodeState
NODE_STATE_SUSPENDED: NodeState
NODE_STATE_NODE_SUSPENDED: NodeState
NODE_STATE_BLOCKED: NodeState
NODE_STATE_FINISHED: NodeState
NODE_STATE_FAILED: NodeState
NODE_STATE_REVOKED: NodeState
NODE_STATE_EXPIRED: NodeState
NODE_STATE_ROLLING_BACK: NodeState
NODE_STATE_ROLL_BACK_SUCCESS: NodeState
NODE_STATE_ROLL_BACK_FAILED: NodeState

class WatchTaskNodeRequest(_message.Message):
    __slots__ = ("node", "resume_token")
    NODE_FIELD_NUMBER: _ClassVar[int]
    RESUME_TOKEN_FIELD_NUMBER: _ClassVar[int]
    node: GetTaskNodeDetailRequest
    resume_token: str
    def __init__(self, node: _Optional[_Union[GetTaskNodeDetailRequest, _Mapping]] = ..., resume_token: _Optional[str] = ...) -> None: ...

class WatchTaskNodeResponse(_message.Message):
    __slots__ = ("detail", "heartbeat_time", "resume_token")
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_TIME_FIELD_NUMBER: _ClassVar[int]
    RESUME_TOKEN_FIELD_NUMBER: _ClassVar[int]
    detail: NodeDetail
    heartbeat_time: _timestamp_pb2.Timestamp
    resume_token: str
    def __init__(self, detail: _Optional[_Union[NodeDetail, _Mapping]] = ..., heartbeat_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., resume_token: _Optional[str] = ...) -> None: ...

class WatchTaskRequest(_message.Message):
    __slots__ = ("bk_biz_id", "task_id", "scope", "resume_token")
    BK_BIZ_ID_FIELD_NUMBER: _ClassVar[int]
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    SCOPE_FIELD_NUMBER: _ClassVar[int]
    RESUME_TOKEN_FIELD_NUMBER: _ClassVar[int]
    bk_biz_id: str
    task_id: str
    scope: Scope
    resume_token: str
    def __init__(self, bk_biz_id: _Optional[str] = ..., task_id: _Optional[str] = ..., scope: _Optional[_Union[Scope, str]] = ..., resume_token: _Optional[str] = ...) -> None: ...

class WatchTaskResponse(_message.Message):
    __slots__ = ("nodes", "resume_token", "heartbeat_time")
    NODES_FIELD_NUMBER: _ClassVar[int]
    RESUME_TOKEN_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_TIME_FIELD_NUMBER: _ClassVar[int]
    nodes: _containers.RepeatedCompositeFieldContainer[NodeDetail]
    resume_token: str
    heartbeat_time: _timestamp_pb2.Timestamp
    def __init__(self, nodes: _Optional[_Iterable[_Union[NodeDetail, _Mapping]]] = ..., resume_token: _Optional[str] = ..., heartbeat_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class GetTaskNodeDetailRequest(_message.Message):
    __slots__ = ("bk_biz_id", "task_id", "node_id", "component_code", "subprocess_stack", "loop", "scope", "max_histories", "read_mask")
    BK_BIZ_ID_FIELD_NUMBER: _ClassVar[int]
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    COMPONENT_CODE_FIELD_NUMBER: _ClassVar[int]
    SUBPROCESS_STACK_FIELD_NUMBER: _ClassVar[int]
    LOOP_FIELD_NUMBER: _ClassVar[int]
    SCOPE_FIELD_NUMBER: _ClassVar[int]
    MAX_HISTORIES_FIELD_NUMBER: _ClassVar[int]
    READ_MASK_FIELD_NUMBER: _ClassVar[int]
    bk_biz_id: str
    task_id: str
    node_id: str
    component_code: str
    subprocess_stack: _containers.RepeatedScalarFieldContainer[str]
    loop: int
    scope: Scope
    max_histories: int
    read_mask: _field_mask_pb2.FieldMask
    def __init__(self, bk_biz_id: _Optional[str] = ..., task_id: _Optional[str] = ..., node_id: _Optional[str] = ..., component_code: _Optional[str] = ..., subprocess_stack: _Optional[_Iterable[str]] = ..., loop: _Optional[int] = ..., scope: _Optional[_Union[Scope, str]] = ..., max_histories: _Optional[int] = ..., read_mask: _Optional[_Union[_field_mask_pb2.FieldMask, _Mapping]] = ...) -> None: ...

class BatchGetTaskNodeDetailsRequest(_message.Message):
    __slots__ = ("requests",)
    REQUESTS_FIELD_NUMBER: _ClassVar[int]
    requests: _containers.RepeatedCompositeFieldContainer[GetTaskNodeDetailRequest]
    def __init__(self, requests: _Optional[_Iterable[_Union[GetTaskNodeDetailRequest, _Mapping]]] = ...) -> None: ...

class BatchGetTaskNodeDetailsResponse(_message.Message):
    __slots__ = ("results",)
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[NodeDetailResult]
    def __init__(self, results: _Optional[_Iterable[_Union[NodeDetailResult, _Mapping]]] = ...) -> None: ...

class NodeDetailResult(_message.Message):
    __slots__ = ("detail", "error")
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    detail: NodeDetail
    error: _status_pb2.Status
    def __init__(self, detail: _Optional[_Union[NodeDetail, _Mapping]] = ..., error: _Optional[_Union[_status_pb2.Status, _Mapping]] = ...) -> None: ...

class ListTaskNodesRequest(_message.Message):
    __slots__ = ("bk_biz_id", "task_id", "scope", "subprocess_stack", "page_size", "page_token", "filter", "view", "read_mask")
    BK_BIZ_ID_FIELD_NUMBER: _ClassVar[int]
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    SCOPE_FIELD_NUMBER: _ClassVar[int]
    SUBPROCESS_STACK_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    FILTER_FIELD_NUMBER: _ClassVar[int]
    VIEW_FIELD_NUMBER: _ClassVar[int]
    READ_MASK_FIELD_NUMBER: _ClassVar[int]
    bk_biz_id: str
    task_id: str
    scope: Scope
    subprocess_stack: _containers.RepeatedScalarFieldContainer[str]
    page_size: int
    page_token: str
    filter: str
    view: NodeView
    read_mask: _field_mask_pb2.FieldMask
    def __init__(self, bk_biz_id: _Optional[str] = ..., task_id: _Optional[str] = ..., scope: _Optional[_Union[Scope, str]] = ..., subprocess_stack: _Optional[_Iterable[str]] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ..., filter: _Optional[str] = ..., view: _Optional[_Union[NodeView, str]] = ..., read_mask: _Optional[_Union[_field_mask_pb2.FieldMask, _Mapping]] = ...) -> None: ...

class ListTaskNodesResponse(_message.Message):
    __slots__ = ("nodes", "next_page_token", "total_size")
    NODES_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    TOTAL_SIZE_FIELD_NUMBER: _ClassVar[int]
    nodes: _containers.RepeatedCompositeFieldContainer[NodeDetail]
    next_page_token: str
    total_size: int
    def __init__(self, nodes: _Optional[_Iterable[_Union[NodeDetail, _Mapping]]] = ..., next_page_token: _Optional[str] = ..., total_size: _Optional[int] = ...) -> None: ...

class NodeDetail(_message.Message):
    __slots__ = ("id", "name", "state", "executed", "start_time", "finish_time", "elapsed_seconds", "skip", "retry", "loop", "error_ignorable", "error_ignored", "version", "inputs", "outputs", "ex_data", "histories", "children", "history_id", "component_code", "subprocess_stack", "etag", "root_pipeline_id", "name_null")
    ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    EXECUTED_FIELD_NUMBER: _ClassVar[int]
    START_TIME_FIELD_NUMBER: _ClassVar[int]
    FINISH_TIME_FIELD_NUMBER: _ClassVar[int]
    ELAPSED_SECONDS_FIELD_NUMBER: _ClassVar[int]
    SKIP_FIELD_NUMBER: _ClassVar[int]
    RETRY_FIELD_NUMBER: _ClassVar[int]
    LOOP_FIELD_NUMBER: _ClassVar[int]
    ERROR_IGNORABLE_FIELD_NUMBER: _ClassVar[int]
    ERROR_IGNORED_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    EX_DATA_FIELD_NUMBER: _ClassVar[int]
    HISTORIES_FIELD_NUMBER: _ClassVar[int]
    CHILDREN_FIELD_NUMBER: _ClassVar[int]
    HISTORY_ID_FIELD_NUMBER: _ClassVar[int]
    COMPONENT_CODE_FIELD_NUMBER: _ClassVar[int]
    SUBPROCESS_STACK_FIELD_NUMBER: _ClassVar[int]
    ETAG_FIELD_NUMBER: _ClassVar[int]
    ROOT_PIPELINE_ID_FIELD_NUMBER: _ClassVar[int]
    NAME_NULL_FIELD_NUMBER: _ClassVar[int]
    id: str
    name: str
    state: NodeState
    executed: bool
    start_time: _timestamp_pb2.Timestamp
    finish_time: _timestamp_pb2.Timestamp
    elapsed_seconds: int
    skip: bool
    retry: int
    loop: int
    error_ignorable: bool
    error_ignored: bool
    version: str
    inputs: _json_value_pb2.JsonObject
    outputs: _containers.RepeatedCompositeFieldContainer[NodeOutput]
    ex_data: str
    histories: _containers.RepeatedCompositeFieldContainer[NodeAttempt]
    children: _containers.RepeatedCompositeFieldContainer[ChildNode]
    history_id: int
    component_code: str
    subprocess_stack: _containers.RepeatedScalarFieldContainer[str]
    etag: str
    root_pipeline_id: str
    name_null: bool
    def __init__(self, id: _Optional[str] = ..., name: _Optional[str] = ..., state: _Optional[_Union[NodeState, str]] = ..., executed: _Optional[bool] = ..., start_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., finish_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., elapsed_seconds: _Optional[int] = ..., skip: _Optional[bool] = ..., retry: _Optional[int] = ..., loop: _Optional[int] = ..., error_ignorable: _Optional[bool] = ..., error_ignored: _Optional[bool] = ..., version: _Optional[str] = ..., inputs: _Optional[_Union[_json_value_pb2.JsonObject, _Mapping]] = ..., outputs: _Optional[_Iterable[_Union[NodeOutput, _Mapping]]] = ..., ex_data: _Optional[str] = ..., histories: _Optional[_Iterable[_Union[NodeAttempt, _Mapping]]] = ..., children: _Optional[_Iterable[_Union[ChildNode, _Mapping]]] = ..., history_id: _Optional[int] = ..., component_code: _Optional[str] = ..., subprocess_stack: _Optional[_Iterable[str]] = ..., etag: _Optional[str] = ..., root_pipeline_id: _Optional[str] = ..., name_null: _Optional[bool] = ...) -> None: ...

class NodeOutput(_message.Message):
    __slots__ = ("key", "name", "value", "preset")
    KEY_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    PRESET_FIELD_NUMBER: _ClassVar[int]
    key: str
    name: str
    value: _json_value_pb2.JsonValue
    preset: bool
    def __init__(self, key: _Optional[str] = ..., name: _Optional[str] = ..., value: _Optional[_Union[_json_value_pb2.JsonValue, _Mapping]] = ..., preset: _Optional[bool] = ...) -> None: ...

class NodeAttempt(_message.Message):
    __slots__ = ("history_id", "node_id", "loop", "retry", "skip", "version", "state", "start_time", "finish_time", "elapsed_seconds", "inputs", "outputs", "ex_data")
    HISTORY_ID_FIELD_NUMBER: _ClassVar[int]
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    LOOP_FIELD_NUMBER: _ClassVar[int]
    RETRY_FIELD_NUMBER: _ClassVar[int]
    SKIP_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    START_TIME_FIELD_NUMBER: _ClassVar[int]
    FINISH_TIME_FIELD_NUMBER: _ClassVar[int]
    ELAPSED_SECONDS_FIELD_NUMBER: _ClassVar[int]
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    EX_DATA_FIELD_NUMBER: _ClassVar[int]
    history_id: int
    node_id: str
    loop: int
    retry: int
    skip: bool
    version: str
    state: NodeState
    start_time: _timestamp_pb2.Timestamp
    finish_time: _timestamp_pb2.Timestamp
    elapsed_seconds: int
    inputs: _json_value_pb2.JsonObject
    outputs: _json_value_pb2.JsonObject
    ex_data: str
    def __init__(self, history_id: _Optional[int] = ..., node_id: _Optional[str] = ..., loop: _Optional[int] = ..., retry: _Optional[int] = ..., skip: _Optional[bool] = ..., version: _Optional[str] = ..., state: _Optional[_Union[NodeState, str]] = ..., start_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., finish_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., elapsed_seconds: _Optional[int] = ..., inputs: _Optional[_Union[_json_value_pb2.JsonObject, _Mapping]] = ..., outputs: _Optional[_Union[_json_value_pb2.JsonObject, _Mapping]] = ..., ex_data: _Optional[str] = ...) -> None: ...

class ChildNode(_message.Message):
    __slots__ = ("id", "name", "state", "start_time", "finish_time", "elapsed_seconds", "skip", "retry", "loop", "error_ignored", "version")
    ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    START_TIME_FIELD_NUMBER: _ClassVar[int]
    FINISH_TIME_FIELD_NUMBER: _ClassVar[int]
    ELAPSED_SECONDS_FIELD_NUMBER: _ClassVar[int]
    SKIP_FIELD_NUMBER: _ClassVar[int]
    RETRY_FIELD_NUMBER: _ClassVar[int]
    LOOP_FIELD_NUMBER: _ClassVar[int]
    ERROR_IGNORED_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    id: str
    name: str
    state: NodeState
    start_time: _timestamp_pb2.Timestamp
    finish_time: _timestamp_pb2.Timestamp
    elapsed_seconds: int
    skip: bool
    retry: int
    loop: int
    error_ignored: bool
    version: str
    def __init__(self, id: _Optional[str] = ..., name: _Optional[str] = ..., state: _Optional[_Union[NodeState, str]] = ..., start_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., finish_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., elapsed_seconds: _Optional[int] = ..., skip: _Optional[bool] = ..., retry: _Optional[int] = ..., loop: _Optional[int] = ..., error_ignored: _Optional[bool] = ..., version: _Optional[str] = ...) -> None: ...
