from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Empty(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class Request(_message.Message):
    __slots__ = ("symbol", "exchanges", "depth")
    SYMBOL_FIELD_NUMBER: _ClassVar[int]
    EXCHANGES_FIELD_NUMBER: _ClassVar[int]
    DEPTH_FIELD_NUMBER: _ClassVar[int]
    symbol: str
    exchanges: _containers.RepeatedScalarFieldContainer[str]
    depth: int
    def __init__(self, symbol: _Optional[str] = ..., exchanges: _Optional[_Iterable[str]] = ..., depth: _Optional[int] = ...) -> None: ...

class Summary(_message.Message):
    __slots__ = ("spread", "bids", "asks", "exchanges", "timestamp_us")
    SPREAD_FIELD_NUMBER: _ClassVar[int]
    BIDS_FIELD_NUMBER: _ClassVar[int]
    ASKS_FIELD_NUMBER: _ClassVar[int]
    EXCHANGES_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMP_US_FIELD_NUMBER: _ClassVar[int]
    spread: float
    bids: _containers.RepeatedCompositeFieldContainer[Level]
    asks: _containers.RepeatedCompositeFieldContainer[Level]
    exchanges: _containers.RepeatedCompositeFieldContainer[ExchangeState]
    timestamp_us: int
    def __init__(self, spread: _Optional[float] = ..., bids: _Optional[_Iterable[_Union[Level, _Mapping]]] = ..., asks: _Optional[_Iterable[_Union[Level, _Mapping]]] = ..., exchanges: _Optional[_Iterable[_Union[ExchangeState, _Mapping]]] = ..., timestamp_us: _Optional[int] = ...) -> None: ...

class Level(_message.Message):
    __slots__ = ("exchange", "price", "amount")
    EXCHANGE_FIELD_NUMBER: _ClassVar[int]
    PRICE_FIELD_NUMBER: _ClassVar[int]
    AMOUNT_FIELD_NUMBER: _ClassVar[int]
    exchange: str
    price: float
    amount: float
    def __init__(self, exchange: _Optional[str] = ..., price: _Optional[float] = ..., amount: _Optional[float] = ...) -> None: ...

class ExchangeState(_message.Message):
    __slots__ = ("exchange", "state", "reason")
    class State(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        STATE_UNSPECIFIED: _ClassVar[ExchangeState.State]
        SYNCING: _ClassVar[ExchangeState.State]
        LIVE: _ClassVar[ExchangeState.State]
        STALE: _ClassVar[ExchangeState.State]
    STATE_UNSPECIFIED: ExchangeState.State
    SYNCING: ExchangeState.State
    LIVE: ExchangeState.State
    STALE: ExchangeState.State
    EXCHANGE_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    exchange: str
    state: ExchangeState.State
    reason: str
    def __init__(self, exchange: _Optional[str] = ..., state: _Optional[_Union[ExchangeState.State, str]] = ..., reason: _Optional[str] = ...) -> None: ...
