"""LLRP 1.0.1 binary encoding for the reader simulator, written from the LLRP Toolkit definition file.

The driver (drivers/llrp.py) encodes and decodes with llrpkit; the simulator
deliberately does not, so that a test between the two proves each side against
an encoder nobody on the other side wrote. Type numbers, field layouts and
enumeration values come from `llrp-1x0-def.xml` (EPCglobal/Impinj LLRP Toolkit,
Apache-2.0, kept in tests/data/llrp/), and tests/test_llrp.py checks every
number below against that file.

Only what a reader sends (responses, reports, events, keepalives) is encoded,
and only what a client sends for an inventory (ROSpec, reader config) is
decoded; anything else is skipped by its TLV length or answered as unsupported.
Wire layout (LLRP 1.0.1 §4): a message is a 10-byte header (3 reserved bits,
3-bit version, 10-bit type, u32 length including the header, u32 message ID)
and a body of fields followed by parameters. Parameter types 1-127 are TV (one
byte 0x80|type, fixed-size value, no length); 128-2047 are TLV (u16 type, u16
length including the 4-byte header).
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass

HEADER = struct.Struct(">HII")
HEADER_LEN = HEADER.size
#: LLRP 1.0.1 in the header's version bits (LLRP 1.1 is 2)
VERSION = 1


class Msg(enum.IntEnum):
    """Message type numbers (llrp-1x0-def.xml messageDefinition typeNum)."""

    GET_READER_CAPABILITIES = 1
    GET_READER_CONFIG = 2
    SET_READER_CONFIG = 3
    CLOSE_CONNECTION_RESPONSE = 4
    GET_READER_CAPABILITIES_RESPONSE = 11
    GET_READER_CONFIG_RESPONSE = 12
    SET_READER_CONFIG_RESPONSE = 13
    CLOSE_CONNECTION = 14
    ADD_ROSPEC = 20
    DELETE_ROSPEC = 21
    START_ROSPEC = 22
    STOP_ROSPEC = 23
    ENABLE_ROSPEC = 24
    DISABLE_ROSPEC = 25
    GET_ROSPECS = 26
    ADD_ROSPEC_RESPONSE = 30
    DELETE_ROSPEC_RESPONSE = 31
    START_ROSPEC_RESPONSE = 32
    STOP_ROSPEC_RESPONSE = 33
    ENABLE_ROSPEC_RESPONSE = 34
    DISABLE_ROSPEC_RESPONSE = 35
    GET_ROSPECS_RESPONSE = 36
    GET_REPORT = 60
    RO_ACCESS_REPORT = 61
    KEEPALIVE = 62
    READER_EVENT_NOTIFICATION = 63
    ENABLE_EVENTS_AND_REPORTS = 64
    KEEPALIVE_ACK = 72
    ERROR_MESSAGE = 100
    CUSTOM_MESSAGE = 1023


class Param(enum.IntEnum):
    """Parameter type numbers (llrp-1x0-def.xml parameterDefinition typeNum); below 128 they are TV."""

    AntennaID = 1
    FirstSeenTimestampUTC = 2
    FirstSeenTimestampUptime = 3
    LastSeenTimestampUTC = 4
    LastSeenTimestampUptime = 5
    PeakRSSI = 6
    ChannelIndex = 7
    TagSeenCount = 8
    ROSpecID = 9
    InventoryParameterSpecID = 10
    C1G2_CRC = 11
    C1G2_PC = 12
    EPC_96 = 13
    SpecIndex = 14
    AccessSpecID = 16
    OpSpecID = 17
    C1G2SingulationDetails = 18
    UTCTimestamp = 128
    GeneralDeviceCapabilities = 137
    ReceiveSensitivityTableEntry = 139
    PerAntennaAirProtocol = 140
    GPIOCapabilities = 141
    LLRPCapabilities = 142
    ROSpec = 177
    ROBoundarySpec = 178
    ROSpecStartTrigger = 179
    ROSpecStopTrigger = 182
    AISpec = 183
    AISpecStopTrigger = 184
    InventoryParameterSpec = 186
    KeepaliveSpec = 220
    AntennaConfiguration = 222
    ROReportSpec = 237
    TagReportContentSelector = 238
    TagReportData = 240
    EPCData = 241
    ReaderEventNotificationSpec = 244
    EventNotificationState = 245
    ReaderEventNotificationData = 246
    ROSpecEvent = 249
    ConnectionAttemptEvent = 256
    ConnectionCloseEvent = 257
    LLRPStatus = 287
    C1G2InventoryCommand = 330
    C1G2SingulationControl = 336
    Custom = 1023


#: value size of every TV parameter (the TV form carries no length; an unknown TV type cannot be skipped)
TV_SIZES: dict[int, int] = {
    Param.AntennaID: 2,
    Param.FirstSeenTimestampUTC: 8,
    Param.FirstSeenTimestampUptime: 8,
    Param.LastSeenTimestampUTC: 8,
    Param.LastSeenTimestampUptime: 8,
    Param.PeakRSSI: 1,
    Param.ChannelIndex: 2,
    Param.TagSeenCount: 2,
    Param.ROSpecID: 4,
    Param.InventoryParameterSpecID: 2,
    Param.C1G2_CRC: 2,
    Param.C1G2_PC: 2,
    Param.EPC_96: 12,
    Param.SpecIndex: 2,
    Param.AccessSpecID: 4,
    Param.OpSpecID: 2,
    Param.C1G2SingulationDetails: 4,
}


class Status(enum.IntEnum):
    """LLRPStatus codes (enumeration StatusCode) the simulator answers with."""

    M_Success = 0
    M_ParameterError = 100
    M_FieldError = 101
    M_MissingParameter = 103
    M_UnknownParameter = 107
    M_UnsupportedMessage = 109
    M_UnsupportedVersion = 110
    M_UnsupportedParameter = 111
    A_Invalid = 300


class ConnectionAttempt(enum.IntEnum):
    """enumeration ConnectionAttemptStatusType."""

    Success = 0
    Failed_A_Reader_Initiated_Connection_Already_Exists = 1
    Failed_A_Client_Initiated_Connection_Already_Exists = 2
    Failed_Reason_Other_Than_A_Connection_Already_Exists = 3
    Another_Connection_Attempted = 4


class StartTrigger(enum.IntEnum):
    """enumeration ROSpecStartTriggerType."""

    Null = 0
    Immediate = 1
    Periodic = 2
    GPI = 3


class StopTrigger(enum.IntEnum):
    """enumeration ROSpecStopTriggerType (AISpecStopTriggerType shares 0-2 and adds 3 Tag_Observation)."""

    Null = 0
    Duration = 1
    GPI_With_Timeout = 2


class ReportTrigger(enum.IntEnum):
    """enumeration ROReportTriggerType."""

    None_ = 0
    Upon_N_Tags_Or_End_Of_AISpec = 1
    Upon_N_Tags_Or_End_Of_ROSpec = 2


class RoSpecEventType(enum.IntEnum):
    """enumeration ROSpecEventType."""

    Start_Of_ROSpec = 0
    End_Of_ROSpec = 1
    Preemption_Of_ROSpec = 2


#: enumeration NotificationEventType value of ROSpec events
NOTIFY_ROSPEC_EVENT = 2
#: enumeration KeepaliveTriggerType value Periodic
KEEPALIVE_PERIODIC = 1
#: enumeration AirProtocols value EPCGlobalClass1Gen2
AIR_PROTOCOL_C1G2 = 1


class WireError(Exception):
    """Bytes that are not the LLRP they claim to be. `status` is the LLRPStatus code to answer with."""

    def __init__(self, reason: str, status: int = Status.M_ParameterError) -> None:
        super().__init__(reason)
        self.reason = reason
        self.status = status


# --------------------------------------------------------------------------- framing


@dataclass(frozen=True)
class Header:
    version: int
    msg_type: int
    length: int
    message_id: int


def parse_header(raw: bytes) -> Header:
    if len(raw) != HEADER_LEN:
        raise WireError(f"header needs {HEADER_LEN} bytes, got {len(raw)}")
    word, length, message_id = HEADER.unpack(raw)
    return Header(version=(word >> 10) & 0x7, msg_type=word & 0x3FF, length=length, message_id=message_id)


def message(msg_type: int, message_id: int, body: bytes = b"", *, version: int = VERSION) -> bytes:
    return HEADER.pack(((version & 0x7) << 10) | (msg_type & 0x3FF), HEADER_LEN + len(body), message_id & 0xFFFFFFFF) + body


# --------------------------------------------------------------------------- parameters: encoding


def tlv(ptype: int, body: bytes = b"") -> bytes:
    if ptype < 128:
        raise ValueError(f"parameter type {ptype} is TV, not TLV")
    if len(body) + 4 > 0xFFFF:
        raise ValueError(f"TLV parameter {ptype} longer than 65535 bytes")
    return struct.pack(">HH", ptype, len(body) + 4) + body


def tv(ptype: int, value: bytes) -> bytes:
    if TV_SIZES.get(ptype) != len(value):
        raise ValueError(f"TV parameter {ptype} takes {TV_SIZES.get(ptype)} bytes, not {len(value)}")
    return bytes((0x80 | ptype,)) + value


def utf8v(text: str) -> bytes:
    raw = text.encode("utf-8")
    return struct.pack(">H", len(raw)) + raw


def llrp_status(code: int = Status.M_Success, description: str = "") -> bytes:
    return tlv(Param.LLRPStatus, struct.pack(">H", code) + utf8v(description))


def utc_timestamp(us: int) -> bytes:
    return tlv(Param.UTCTimestamp, struct.pack(">Q", us))


def reader_event(timestamp_us: int, event: bytes) -> bytes:
    """READER_EVENT_NOTIFICATION body: ReaderEventNotificationData(UTCTimestamp, one event parameter)."""
    return tlv(Param.ReaderEventNotificationData, utc_timestamp(timestamp_us) + event)


def connection_attempt_event(status: int) -> bytes:
    return tlv(Param.ConnectionAttemptEvent, struct.pack(">H", status))


def connection_close_event() -> bytes:
    return tlv(Param.ConnectionCloseEvent)


def rospec_event(event_type: int, ro_spec_id: int, preempting: int = 0) -> bytes:
    return tlv(Param.ROSpecEvent, struct.pack(">BII", event_type, ro_spec_id, preempting))


def capabilities(*, antennas: int, manufacturer: int, model: int, firmware: str) -> bytes:
    """GET_READER_CAPABILITIES_RESPONSE body after the status: GeneralDeviceCapabilities + LLRPCapabilities."""
    general = (
        struct.pack(">HHII", antennas, 0b01 << 14, manufacturer, model)  # CanSetAntennaProperties 0, HasUTCClockCapability 1
        + utf8v(firmware)
        + tlv(Param.ReceiveSensitivityTableEntry, struct.pack(">Hh", 1, 0))
        + tlv(Param.GPIOCapabilities, struct.pack(">HH", 0, 0))
        + b"".join(tlv(Param.PerAntennaAirProtocol, struct.pack(">HH", a, 1) + bytes((AIR_PROTOCOL_C1G2,))) for a in range(1, antennas + 1))
    )
    llrp_caps = struct.pack(">BBHIIIII", 0, 1, 0, 8, 1, 1, 0, 0)  # no flags, 1 priority level, 8 ROSpecs, no AccessSpecs
    return tlv(Param.GeneralDeviceCapabilities, general) + tlv(Param.LLRPCapabilities, llrp_caps)


@dataclass(frozen=True)
class ReportContent:
    """What a TagReportContentSelector asks each TagReportData to carry."""

    ro_spec_id: bool = False
    spec_index: bool = False
    inventory_parameter_spec_id: bool = False
    antenna_id: bool = False
    channel_index: bool = False
    peak_rssi: bool = False
    first_seen: bool = False
    last_seen: bool = False
    seen_count: bool = False
    access_spec_id: bool = False


@dataclass(frozen=True)
class Observation:
    """One tag as the reader reports it (one TagReportData): the EPC bank's bits and the enabled fields."""

    epc: bytes
    epc_bits: int
    antenna: int
    peak_rssi: int
    first_seen_us: int
    last_seen_us: int
    seen_count: int
    channel_index: int = 1
    ro_spec_id: int = 0
    spec_index: int = 1
    inventory_parameter_spec_id: int = 1


def epc_parameter(epc: bytes, bits: int) -> bytes:
    """EPC_96 (TV) for exactly 96 bits, else EPCData: u1v, a bit count then the bits MSB first, zero padded."""
    if len(epc) != (bits + 7) // 8:
        raise ValueError(f"{bits} EPC bits need {(bits + 7) // 8} bytes, got {len(epc)}")
    if bits == 96:
        return tv(Param.EPC_96, epc)
    return tlv(Param.EPCData, struct.pack(">H", bits) + epc)


def tag_report_data(obs: Observation, content: ReportContent) -> bytes:
    """One TagReportData, its sub-parameters in the order the definition lists them."""
    parts = [epc_parameter(obs.epc, obs.epc_bits)]
    if content.ro_spec_id:
        parts.append(tv(Param.ROSpecID, struct.pack(">I", obs.ro_spec_id)))
    if content.spec_index:
        parts.append(tv(Param.SpecIndex, struct.pack(">H", obs.spec_index)))
    if content.inventory_parameter_spec_id:
        parts.append(tv(Param.InventoryParameterSpecID, struct.pack(">H", obs.inventory_parameter_spec_id)))
    if content.antenna_id:
        parts.append(tv(Param.AntennaID, struct.pack(">H", obs.antenna)))
    if content.peak_rssi:
        parts.append(tv(Param.PeakRSSI, struct.pack(">b", max(-128, min(127, obs.peak_rssi)))))
    if content.channel_index:
        parts.append(tv(Param.ChannelIndex, struct.pack(">H", obs.channel_index)))
    if content.first_seen:
        parts.append(tv(Param.FirstSeenTimestampUTC, struct.pack(">Q", obs.first_seen_us)))
    if content.last_seen:
        parts.append(tv(Param.LastSeenTimestampUTC, struct.pack(">Q", obs.last_seen_us)))
    if content.seen_count:
        parts.append(tv(Param.TagSeenCount, struct.pack(">H", min(0xFFFF, obs.seen_count))))
    return tlv(Param.TagReportData, b"".join(parts))


# --------------------------------------------------------------------------- parameters: decoding


@dataclass(frozen=True)
class Item:
    """One parameter as found on the wire: its type and its value bytes (fields, then sub-parameters for a TLV)."""

    ptype: int
    body: bytes


def parse_params(buf: bytes) -> list[Item]:
    """Split a run of parameters. Every length is checked against the buffer: a lie is a WireError, never an IndexError."""
    out: list[Item] = []
    pos = 0
    while pos < len(buf):
        first = buf[pos]
        if first & 0x80:
            ptype = first & 0x7F
            size = TV_SIZES.get(ptype)
            if size is None:
                raise WireError(f"unknown TV parameter type {ptype}", Status.M_UnknownParameter)
            if pos + 1 + size > len(buf):
                raise WireError(f"TV parameter {ptype} truncated")
            out.append(Item(ptype, buf[pos + 1 : pos + 1 + size]))
            pos += 1 + size
            continue
        if pos + 4 > len(buf):
            raise WireError("parameter header truncated")
        ptype, length = struct.unpack_from(">HH", buf, pos)
        ptype &= 0x3FF
        if length < 4 or pos + length > len(buf):
            raise WireError(f"parameter {ptype} length {length} does not fit its container")
        out.append(Item(ptype, buf[pos + 4 : pos + length]))
        pos += length
    return out


def _fields(item: Item, size: int, what: str) -> tuple[bytes, list[Item]]:
    if len(item.body) < size:
        raise WireError(f"{what} fields truncated", Status.M_FieldError)
    return item.body[:size], parse_params(item.body[size:])


def _one(items: list[Item], ptype: int, what: str) -> Item:
    found = [i for i in items if i.ptype == ptype]
    if not found:
        raise WireError(f"{what} lacks its {Param(ptype).name}", Status.M_MissingParameter)
    return found[0]


def _opt(items: list[Item], ptype: int) -> Item | None:
    return next((i for i in items if i.ptype == ptype), None)


@dataclass(frozen=True)
class AiSpec:
    antenna_ids: tuple[int, ...]  # (0,) = every antenna
    stop_trigger: int
    stop_duration_ms: int
    session: int | None
    tag_population: int | None


@dataclass(frozen=True)
class ReportSpec:
    trigger: int
    n: int
    content: ReportContent


@dataclass(frozen=True)
class RoSpec:
    ro_spec_id: int
    priority: int
    start_trigger: int
    stop_trigger: int
    stop_duration_ms: int
    ai_specs: tuple[AiSpec, ...]
    report: ReportSpec | None


def decode_report_spec(item: Item) -> ReportSpec:
    fields, subs = _fields(item, 3, "ROReportSpec")
    trigger, n = struct.unpack(">BH", fields)
    sel = _one(subs, Param.TagReportContentSelector, "ROReportSpec")
    if len(sel.body) < 2:
        raise WireError("TagReportContentSelector fields truncated", Status.M_FieldError)
    bits = struct.unpack_from(">H", sel.body)[0]
    flag = [bool(bits >> (15 - i) & 1) for i in range(10)]
    return ReportSpec(trigger, n, ReportContent(*flag))


def _decode_ai_spec(item: Item) -> AiSpec:
    if len(item.body) < 2:
        raise WireError("AISpec fields truncated", Status.M_FieldError)
    count = struct.unpack_from(">H", item.body)[0]
    size = 2 + 2 * count
    fields, subs = _fields(item, size, "AISpec")
    antennas = struct.unpack(f">{count}H", fields[2:])
    stop = _one(subs, Param.AISpecStopTrigger, "AISpec")
    stop_type, duration = struct.unpack(">BI", _fields(stop, 5, "AISpecStopTrigger")[0])
    session: int | None = None
    population: int | None = None
    for ips in (i for i in subs if i.ptype == Param.InventoryParameterSpec):
        _, ips_subs = _fields(ips, 3, "InventoryParameterSpec")
        for cfg in (i for i in ips_subs if i.ptype == Param.AntennaConfiguration):
            for cmd in (i for i in _fields(cfg, 2, "AntennaConfiguration")[1] if i.ptype == Param.C1G2InventoryCommand):
                ctl = _opt(_fields(cmd, 1, "C1G2InventoryCommand")[1], Param.C1G2SingulationControl)
                if ctl is not None:
                    head = _fields(ctl, 7, "C1G2SingulationControl")[0]
                    session, population = head[0] >> 6, struct.unpack_from(">H", head, 1)[0]
    if not any(i.ptype == Param.InventoryParameterSpec for i in subs):
        raise WireError("AISpec lacks an InventoryParameterSpec", Status.M_MissingParameter)
    return AiSpec(tuple(antennas), stop_type, duration, session, population)


def decode_rospec(item: Item) -> RoSpec:
    """An ROSpec parameter, down to what the simulator acts on; anything malformed is a WireError."""
    fields, subs = _fields(item, 6, "ROSpec")
    ro_spec_id, priority, _state = struct.unpack(">IBB", fields)
    boundary = _parse(_one(subs, Param.ROBoundarySpec, "ROSpec"))
    start = _one(boundary, Param.ROSpecStartTrigger, "ROBoundarySpec")
    stop = _one(boundary, Param.ROSpecStopTrigger, "ROBoundarySpec")
    start_type = _fields(start, 1, "ROSpecStartTrigger")[0][0]
    stop_type, duration = struct.unpack(">BI", _fields(stop, 5, "ROSpecStopTrigger")[0])
    ai_specs = tuple(_decode_ai_spec(i) for i in subs if i.ptype == Param.AISpec)
    if not ai_specs:
        raise WireError("ROSpec has no AISpec", Status.M_MissingParameter)
    report_item = _opt(subs, Param.ROReportSpec)
    report = decode_report_spec(report_item) if report_item is not None else None
    return RoSpec(ro_spec_id, priority, start_type, stop_type, duration, ai_specs, report)


def _parse(item: Item) -> list[Item]:
    return parse_params(item.body)


@dataclass(frozen=True)
class ReaderConfig:
    """The parts of SET_READER_CONFIG the simulator honours."""

    reset_to_factory_default: bool
    keepalive_ms: int | None  # None: no KeepaliveSpec in the message; 0: keepalives off
    notifications: dict[int, bool]
    report: ReportSpec | None


def decode_set_reader_config(body: bytes) -> ReaderConfig:
    if len(body) < 1:
        raise WireError("SET_READER_CONFIG fields truncated", Status.M_FieldError)
    subs = parse_params(body[1:])
    keepalive: int | None = None
    ka = _opt(subs, Param.KeepaliveSpec)
    if ka is not None:
        trigger, period = struct.unpack(">BI", _fields(ka, 5, "KeepaliveSpec")[0])
        keepalive = period if trigger == KEEPALIVE_PERIODIC else 0
    notifications: dict[int, bool] = {}
    spec = _opt(subs, Param.ReaderEventNotificationSpec)
    if spec is not None:
        for state in (i for i in _parse(spec) if i.ptype == Param.EventNotificationState):
            head = _fields(state, 3, "EventNotificationState")[0]
            notifications[struct.unpack_from(">H", head)[0]] = bool(head[2] & 0x80)
    report_item = _opt(subs, Param.ROReportSpec)
    return ReaderConfig(
        reset_to_factory_default=bool(body[0] & 0x80),
        keepalive_ms=keepalive,
        notifications=notifications,
        report=decode_report_spec(report_item) if report_item is not None else None,
    )


def u32_field(body: bytes, what: str) -> int:
    """The single u32 field of DELETE/START/STOP/ENABLE/DISABLE_ROSPEC."""
    if len(body) != 4:
        raise WireError(f"{what} carries a 4-byte ROSpecID, got {len(body)} bytes", Status.M_FieldError)
    value: int = struct.unpack(">I", body)[0]
    return value
