"""The line configuration: one YAML file per line, validated into pydantic models.

Unknown keys are refused everywhere: on a regulated line a misspelt setting
that is silently ignored is worse than a config that does not load.
Device sections are a discriminated union on `driver:` built from the driver
registry (`drivers.registry`), the way Frigate selects detectors.
"""

from __future__ import annotations

import hashlib
import os
import re
from typing import TYPE_CHECKING, Annotated, Any, Literal, Union
from urllib.parse import urlsplit
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator

from linectl import gs1
from linectl.access.settings import DISABLED as ACCESS_DISABLED
from linectl.access.settings import AccessConfig
from linectl.drivers.base import DriverConfig
from linectl.drivers.registry import device_config_classes
from linectl.epc import SGTIN96_MAX_SERIAL, EpcValue, choose_scheme, make_epc
from linectl.yamlsource import ConfigFileError, Problem, dotted, line_of, parse_yaml, read_config_bytes, substitute_env, to_plain

#: a fixed UTC offset as EPCIS writes eventTimeZoneOffset
_FIXED_OFFSET = r"^[+-]((0\d|1[0-3]):[0-5]\d|14:00)$"
#: characters of GS1 set 82 that an EPC URI escapes (TDS 2.x, section 6.3 / 14.3)
_URI_ESCAPES = {c: f"%{ord(c):02X}" for c in "\"%&/<>?"}
_SGLN_EXTENSION = r"^[!\"%&'()*+,\-./0-9:;<=>?A-Z_a-z]{1,20}$"

GS1_SET82 = re.compile(r"^[!\"%&'()*+,\-./0-9:;<=>?A-Z_a-z]+$")
FMD_MAX_GUESS_PROBABILITY = 1e-4


class Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


# --------------------------------------------------------------------------- identity


class LineIdentity(Model):
    """Where the line sits in the ISA-95 hierarchy; also the default MQTT topic root and EPCIS locations."""

    enterprise: str = Field(pattern=r"^[A-Za-z0-9_-]+$")
    site: str = Field(pattern=r"^[A-Za-z0-9_-]+$")
    area: str = Field(pattern=r"^[A-Za-z0-9_-]+$")
    name: str = Field(pattern=r"^[A-Za-z0-9_-]+$")
    gln: str = Field(description="13-digit GLN of the site/line, used for EPCIS readPoint/bizLocation")
    company_prefix_length: int = Field(ge=4, le=12, description="GS1 company prefix length of the GLN")
    gln_extension: str = Field("0", pattern=r"^[!\"%&'()*+,\-./0-9:;<=>?A-Z_a-z]{1,20}$")
    timezone: str | None = Field(
        None, description="IANA zone (Europe/Berlin: the offset follows summer time) or a fixed offset (+01:00); default +00:00"
    )
    timezone_offset: str | None = Field(
        None, pattern=_FIXED_OFFSET, description="older spelling of a fixed `timezone`; give one of the two, not both"
    )

    @field_validator("timezone")
    @classmethod
    def _timezone(cls, v: str | None) -> str | None:
        if v is None or re.fullmatch(_FIXED_OFFSET, v):
            return v
        try:
            ZoneInfo(v)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"{v!r} is neither an IANA time zone (e.g. Europe/Berlin) nor a fixed offset (e.g. +01:00)") from None
        return v

    @model_validator(mode="after")
    def _one_timezone(self) -> LineIdentity:
        if self.timezone is not None and self.timezone_offset is not None:
            raise ValueError("give line.timezone or line.timezone_offset, not both (timezone_offset is the older spelling of a fixed timezone)")
        return self

    @property
    def zone(self) -> str:
        """The time zone in force: an IANA name or a fixed "+HH:MM" offset."""
        return self.timezone or self.timezone_offset or "+00:00"

    @field_validator("gln")
    @classmethod
    def _gln(cls, v: str) -> str:
        if not re.fullmatch(r"\d{13}", v):
            raise ValueError("GLN must be 13 digits")
        if gs1.gtin_check_digit(v[:-1]) != v[-1]:
            raise ValueError(f"GLN check digit is {v[-1]}, expected {gs1.gtin_check_digit(v[:-1])}")
        return v

    @property
    def sgln(self) -> str:
        return self.sgln_with(self.gln_extension)

    def sgln_with(self, extension: str) -> str:
        """SGLN EPC URI of this GLN with `extension` (TDS URI-escaped): the line's, or one of its stations'."""
        cp = self.gln[: self.company_prefix_length]
        loc = self.gln[self.company_prefix_length : 12]
        ext = "".join(_URI_ESCAPES.get(c, c) for c in extension)
        return f"urn:epc:id:sgln:{cp}.{loc}.{ext}"

    @property
    def topic_root(self) -> str:
        return f"{self.enterprise}/{self.site}/{self.area}/{self.name}"


# --------------------------------------------------------------------------- serials


def _refuse_low_water(data: Any, why: str) -> Any:
    """`low_water` once was accepted for every scheme and did nothing but for pool: refuse it by name."""
    if isinstance(data, dict) and "low_water" in data:
        raise ValueError(f"low_water applies to scheme pool only ({why}); remove it")
    return data


class RandomSerials(Model):
    """Non-deterministic randomisation (EU FMD art. 4): guess probability must stay below 1 in 10,000."""

    scheme: Literal["random"]
    alphabet: str = "0123456789ABCDEFGHJKLMNPQRSTUVWXYZ"
    length: int = Field(12, ge=1, le=20)
    planned_volume: int = Field(1_000_000, gt=0, description="serials expected for this GTIN over its lifetime")

    @model_validator(mode="before")
    @classmethod
    def _no_low_water(cls, data: Any) -> Any:
        return _refuse_low_water(data, "random serials are drawn on the line and never run low")

    @field_validator("alphabet")
    @classmethod
    def _alphabet(cls, v: str) -> str:
        if len(set(v)) != len(v):
            raise ValueError("alphabet has repeated characters")
        if len(v) < 2:
            raise ValueError("alphabet needs at least 2 characters")
        if not GS1_SET82.match(v):
            raise ValueError("alphabet has characters outside GS1 character set 82")
        return v

    @model_validator(mode="after")
    def _guess_probability(self) -> RandomSerials:
        p = self.guess_probability
        if p >= FMD_MAX_GUESS_PROBABILITY:
            raise ValueError(
                f"guess probability {p:.3g} for planned_volume {self.planned_volume} over "
                f"{len(self.alphabet)}^{self.length} is not below 1 in 10,000 (EU FMD); "
                "use a longer serial or a larger alphabet"
            )
        return self

    @property
    def guess_probability(self) -> float:
        return float(self.planned_volume / (len(self.alphabet) ** self.length))


class SequentialSerials(Model):
    """Numeric counting serials, for markets that allow predictable serials (never for EU FMD)."""

    scheme: Literal["sequential"]
    start: int = Field(1, ge=0)
    step: int = Field(1, ge=1)
    width: int = Field(0, ge=0, le=20, description="zero-pad to this width; 0 = no padding")

    @model_validator(mode="before")
    @classmethod
    def _no_low_water(cls, data: Any) -> Any:
        return _refuse_low_water(data, "sequential serials are counted on the line and never run low")


class PoolSerials(Model):
    """Serials provisioned upstream (L3/L4) and imported or received over MQTT."""

    scheme: Literal["pool"]
    low_water: int = Field(1000, ge=0, description="raise an alarm and request more below this many available")
    request_count: int = Field(10000, gt=0, description="how many to ask upstream for when low")
    # --- with a serial source (linectl/sources/provisioner.py); without one: the MQTT serials/request path
    source: SerialSourceConfig | None = Field(None, description="the L3/L4 the pool is filled from, asked by linectl itself")
    return_unused_at_close: bool = Field(
        False, description="source: at batch close, give the batch's voided (never printed) serials back when the protocol has a return"
    )
    check_interval_s: float = Field(30.0, gt=0, le=86_400, description="source: how often the pool is looked at besides the line's nudge")
    retry_max_s: float = Field(60.0, ge=0.1, le=3600, description="source: cap of the jittered backoff while the source is unavailable")
    request_alarm_s: float = Field(
        600.0, gt=0, le=86_400, description="source: alarm once when a request has waited this long for its answer"
    )

    @model_validator(mode="after")
    def _keys_need_source(self) -> PoolSerials:
        given = [k for k in ("return_unused_at_close", "check_interval_s", "retry_max_s", "request_alarm_s") if k in self.model_fields_set]
        if given and self.source is None:
            raise ValueError(f"{', '.join(given)} apply to a pool with a serial source only; set source or remove them")
        return self


# ---- serial sources (serials.source): the L3/L4 a pool product's serials are asked from (linectl.sources)

_ENV_NAME = r"^[A-Za-z_][A-Za-z0-9_]*$"


class SourceAuth(Model):
    """How a source logs in to the L3. Secrets are never in the YAML: they are read from the environment or a file."""

    type: Literal["none", "basic", "token"] = "none"
    username: str | None = Field(None, min_length=1, description="basic: the L3 user")
    password_env: str | None = Field(None, pattern=_ENV_NAME, description="basic: environment variable holding the password")
    password_file: str | None = Field(None, min_length=1, description="basic: file holding the password (one line)")
    token_env: str | None = Field(None, pattern=_ENV_NAME, description="token: environment variable holding the API token")
    token_file: str | None = Field(None, min_length=1, description="token: file holding the API token (one line)")

    @model_validator(mode="after")
    def _complete(self) -> SourceAuth:
        given = {k for k in ("username", "password_env", "password_file", "token_env", "token_file") if getattr(self, k) is not None}
        wanted = {"none": set(), "basic": {"username", "password_env", "password_file"}, "token": {"token_env", "token_file"}}[self.type]
        if given - wanted:
            raise ValueError(f"auth type {self.type} takes no {', '.join(sorted(given - wanted))}")
        if self.type == "basic" and (self.username is None or (self.password_env is None) == (self.password_file is None)):
            raise ValueError("auth type basic needs username and exactly one of password_env, password_file")
        if self.type == "token" and (self.token_env is None) == (self.token_file is None):
            raise ValueError("auth type token needs exactly one of token_env, token_file")
        return self


class SourceTls(Model):
    """TLS towards the L3 (https URLs only)."""

    ca_file: str | None = Field(None, min_length=1, description="CA bundle the L3's certificate must chain to; default: the system's")
    client_cert: str | None = Field(None, min_length=1, description="client certificate (PEM) for mutual TLS")
    client_key: str | None = Field(None, min_length=1, description="its private key (PEM); default: inside client_cert")
    verify: bool = Field(True, description="false only on a desk: the L3's certificate is not checked")

    @model_validator(mode="after")
    def _key_needs_cert(self) -> SourceTls:
        if self.client_key is not None and self.client_cert is None:
            raise ValueError("tls.client_key needs tls.client_cert")
        if not self.verify and self.ca_file is not None:
            raise ValueError("tls.ca_file with verify false: the CA would not be used")
        return self


class _HttpSourceConfig(Model):
    url: str = Field(description="serialbox: the L3 base URL; number_range: the SOAP endpoint itself (http:// or https://)")
    auth: SourceAuth = Field(default_factory=SourceAuth)
    tls: SourceTls | None = None
    timeout_s: float = Field(30.0, gt=0, le=600, description="one request's connect/read timeout; past it the L3 is unavailable")
    page_size: int = Field(
        1000, gt=0, le=100_000, description="most serials asked in one request; keep it <= the L3 pool's request_threshold"
    )

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        parts = urlsplit(v)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"{v!r} is not an http:// or https:// URL with a host")
        if parts.query or parts.fragment:
            raise ValueError(f"{v!r}: the base URL takes no query or fragment")
        return v

    @model_validator(mode="after")
    def _tls_needs_https(self) -> _HttpSourceConfig:
        if self.tls is not None and not self.url.startswith("https://"):
            raise ValueError("tls is given but the url is not https://")
        return self


class SerialboxSourceConfig(_HttpSourceConfig):
    """QU4RTET serialbox REST: GET <url>/serialbox/allocate/<pool>/<size>/?format=<format>."""

    type: Literal["serialbox"]
    pool: str | None = Field(
        None, pattern=r"^[A-Za-z0-9_.:-]{1,100}$", description="the serialbox pool's machine_name; default: the product's GTIN-14"
    )
    format: Literal["json", "xml"] = Field("json", description="answer format serialbox is asked for")


class NumberRangeSourceConfig(_HttpSourceConfig):
    """The SOAP number-range request (SAP AII/ATTP and Guardian, UniTrace, TraceLink SNX) POSTed to `url` itself."""

    type: Literal["number_range"]
    flavour: Literal["sap", "unitrace", "tracelink"]
    sending_system: str = Field(min_length=1, max_length=100, description="SendingSystem: this line as the L3 knows it")
    receiving_system: str | None = Field(None, min_length=1, max_length=100, description="ReceivingSystem: the L3 as it names itself")
    id_type: Literal["GTIN", "SSCC"] = "GTIN"
    encoding_type: str | None = Field(
        None, pattern=r"^[A-Za-z0-9_-]{1,32}$",
        description="EncodingType; default sap/unitrace: SGTIN-198 (GTIN) or SSCC-96 (SSCC), tracelink: SGTIN or SSCC",
    )
    object_key_name: Literal["GTIN", "SSCC", "GCP", "COMPANY_PREFIX"] | None = Field(
        None, description="ObjectKey/Name; default GTIN for id_type GTIN, else GCP (tracelink: COMPANY_PREFIX)"
    )
    object_key_value: str | None = Field(
        None, pattern=r"^[A-Za-z0-9_.:-]{1,100}$", description="ObjectKey/Value (the L3's pool); default: the product's GTIN-14"
    )
    randomized: bool = Field(True, description="RequestRandomizedNumbers: ask for a randomised list instead of an interval")


SerialScheme = Annotated[RandomSerials | SequentialSerials | PoolSerials, Field(discriminator="scheme")]


# --- serial source: OPEN-SCS (OPC 30260) pool manager over OPC UA (linectl.sources.openscs) ---------------------

_OPENSCS_PLACEHOLDERS = frozenset({"gtin", "lot"})


def _openscs_template(v: str) -> str:
    import string

    try:
        names = {f for _, f, _, _ in string.Formatter().parse(v) if f is not None}
    except ValueError as exc:
        raise ValueError(f"template {v!r}: {exc}") from None
    unknown = names - _OPENSCS_PLACEHOLDERS
    if unknown:
        raise ValueError(f"template {v!r}: unknown placeholder(s) {sorted(unknown)}; known: {{gtin}}, {{lot}}")
    return v


class OpenScsSecurityConfig(Model):
    """The OPC UA secure channel; the certificate's SubjectAltName URI is sent as the client's application URI."""

    policy: Literal["None", "Basic256Sha256"] = "None"
    mode: Literal["Sign", "SignAndEncrypt"] = "SignAndEncrypt"
    certificate: str | None = Field(None, description="client application certificate (PEM or DER)")
    private_key: str | None = Field(None, description="the certificate's private key (PEM)")
    server_certificate: str | None = Field(
        None, description="the L3's certificate, pinned (PEM or DER); without it the one the endpoint announces is taken"
    )

    @model_validator(mode="after")
    def _complete(self) -> OpenScsSecurityConfig:
        if self.policy == "None":
            if self.certificate or self.private_key or self.server_certificate:
                raise ValueError("certificate/private_key/server_certificate need policy: Basic256Sha256")
        elif not (self.certificate and self.private_key):
            raise ValueError("policy Basic256Sha256 needs certificate and private_key")
        return self


class OpenScsSourceConfig(Model):
    """`serials.source` of type openscs: SNRequestAllocated / SNReturnAllocated on an OPEN-SCS pool manager."""

    type: Literal["openscs"]
    endpoint: str = Field(pattern=r"^opc\.tcp://[^\s/]+(/\S*)?$", description="opc.tcp://host:port[/path] of the L3")
    security: OpenScsSecurityConfig = Field(default_factory=OpenScsSecurityConfig)
    username: str | None = Field(None, min_length=1, description="OPC UA user; without it the session is anonymous")
    password_env: str | None = Field(None, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$", description="environment variable with the password")
    password_file: str | None = Field(None, min_length=1, description="file whose first line is the password")
    timeout_s: float = Field(10.0, gt=0, le=300, description="connect and each method call; past it the L3 counts as unavailable")
    pool_manager: str | None = Field(
        None, min_length=1,
        description="browse path of the pool manager object below Objects ('Plant/PoolManager', browse names); "
        "default: the one object of OPENSCSPoolManagerObjectType found within three levels",
    )
    sn_format: Literal["SERIALONLY", "EPCURI"] = Field(
        "SERIALONLY", description="SNFormat asked for; EPCURI answers name their GTIN, so serials of another GTIN are caught"
    )
    collection_id: str = Field("{gtin}", description="SNCollectionID sent; placeholders {gtin} and {lot}")
    selection_criteria: dict[str, str] = Field(
        default_factory=lambda: {"GTIN": "{gtin}"},
        description="PoolSelectionCriteria key/value pairs sent (keys as the L3's PoolSelectionCriteria property lists "
        "them); values may use {gtin} and {lot}",
    )

    @field_validator("collection_id")
    @classmethod
    def _collection_template(cls, v: str) -> str:
        return _openscs_template(v)

    @field_validator("selection_criteria")
    @classmethod
    def _criteria_templates(cls, v: dict[str, str]) -> dict[str, str]:
        if not v:
            raise ValueError("at least one pool selection criterion is needed (the L3 picks the pool by it)")
        for key, value in v.items():
            if not key:
                raise ValueError("a selection criterion needs a key")
            _openscs_template(value)
        return v

    @model_validator(mode="after")
    def _credentials(self) -> OpenScsSourceConfig:
        if self.password_env and self.password_file:
            raise ValueError("give password_env or password_file, not both")
        if self.username and not (self.password_env or self.password_file):
            raise ValueError("username needs password_env or password_file (a password is never written in the YAML)")
        if not self.username and (self.password_env or self.password_file):
            raise ValueError("password_env/password_file need username")
        return self


#: serials.source: discriminated by `type` (linectl.sources.base.SOURCES has one class per member)
SerialSourceConfig = Annotated[SerialboxSourceConfig | NumberRangeSourceConfig | OpenScsSourceConfig, Field(discriminator="type")]


class ProductRfid(Model):
    """How a product's RFID tag is encoded (GS1 EPC Tag Data Standard); the company prefix length is the product's."""

    scheme: Literal["auto", "sgtin-96", "sgtin-198"] = Field(
        "auto", description="auto: SGTIN-96 for each serial it can hold (numeric, no leading zero, <= 274877906943), else SGTIN-198"
    )
    filter_value: int = Field(1, ge=0, le=7, description="EPC filter value; 1 = point of sale (POS) trade item (TDS)")


class Product(Model):
    gtin: str
    name: str
    company_prefix_length: int = Field(ge=4, le=12)
    market: str = Field("EU-FMD", description="free text for reports; EU-FMD forbids sequential serials")
    code_template: list[str] = Field(
        default_factory=lambda: ["01", "17", "10", "21"],
        description="AIs printed in the DataMatrix: 01, 21, 10 and the dates 11/13/15/16/17 come from the product and "
        "batch, any other AI from extra_ais; fixed-length ones are moved first automatically",
    )
    extra_ais: dict[str, str] = Field(
        default_factory=dict, description="constant AIs printed on every unit, e.g. NHRN {'714': '1234567'}"
    )
    serials: SerialScheme
    min_grade: float = Field(1.5, ge=0.0, le=4.0, description="ISO 15415 overall grade below which a unit is rejected")
    allow_dmre: bool = Field(False, description="accept GS1 in a rectangular extension DataMatrix (DMRE, ISO 21471, reported as ]d8)")
    shelf_life_days: int | None = Field(
        None, gt=0, le=36_500,
        description="a batch's expiry may be at most this many days after its production_date (or, without one, "
        "after the day the batch is created)",
    )
    carrier: Literal["datamatrix", "rfid", "both"] = Field(
        "datamatrix",
        description="what carries each unit's identity and is verified: the printed DataMatrix, the label's RFID tag "
        "(encoded and read back by an RFID label printer), or both (a unit passes only when both verify)",
    )
    rfid: ProductRfid | None = Field(None, description="carrier rfid/both: how the tag's EPC is encoded (default: scheme auto, filter 1)")
    _code_template: gs1.CodeTemplate = PrivateAttr()

    @field_validator("gtin")
    @classmethod
    def _gtin(cls, v: str) -> str:
        try:
            return gs1.normalize_gtin(v)
        except gs1.GS1Error as exc:
            raise ValueError(exc.reason) from exc

    @model_validator(mode="after")
    def _template(self) -> Product:
        try:
            self._code_template = gs1.CodeTemplate.build(self.code_template, self.extra_ais)
        except gs1.GS1Error as exc:
            raise ValueError(exc.reason) from None
        return self

    @property
    def template(self) -> gs1.CodeTemplate:
        """The validated unit code template (code_template + extra_ais): printing, verification and EPCIS use it."""
        return self._code_template

    @model_validator(mode="after")
    def _market_rules(self) -> Product:
        if self.market.upper().startswith("EU") and self.serials.scheme == "sequential":
            raise ValueError("market EU-FMD requires randomised serials; sequential is refused")
        if self.gtin[1 : 1 + self.company_prefix_length] == "" or self.company_prefix_length > 12:
            raise ValueError("company_prefix_length does not fit the GTIN")
        return self

    @model_validator(mode="after")
    def _rfid_rules(self) -> Product:
        if self.carrier == "datamatrix":
            if self.rfid is not None:
                raise ValueError("rfid: applies to carrier rfid or both; this product's carrier is datamatrix")
            return self
        if self.rfid is None:
            self.rfid = ProductRfid()
        if self.company_prefix_length < 6:
            raise ValueError(
                f"carrier {self.carrier}: an SGTIN EPC needs a company prefix of 6 to 12 digits (TDS partition table), "
                f"company_prefix_length is {self.company_prefix_length}"
            )
        if self.rfid.scheme == "sgtin-96":
            problem = sgtin96_serials_problem(self.serials)
            if problem is not None:
                raise ValueError(f"rfid.scheme sgtin-96: {problem}; use scheme auto or sgtin-198")
        return self

    @property
    def rfid_carrier(self) -> bool:
        """Each unit's label carries an RFID tag to encode and verify (carrier rfid or both)."""
        return self.carrier != "datamatrix"

    @property
    def datamatrix_carrier(self) -> bool:
        """Each unit's printed DataMatrix is read back and verified (carrier datamatrix or both)."""
        return self.carrier != "rfid"

    def epc(self, gtin: str, serial: str) -> EpcValue:
        """The EPC this product's tag carries for `serial` (EpcError when the scheme cannot hold it)."""
        rf = self.rfid or ProductRfid()
        scheme = choose_scheme(serial) if rf.scheme == "auto" else rf.scheme
        return make_epc(scheme, gtin=gtin, serial=serial, company_prefix_length=self.company_prefix_length, filter_value=rf.filter_value)


def sgtin96_serials_problem(serials: RandomSerials | SequentialSerials | PoolSerials) -> str | None:
    """Why a serial scheme can produce serials SGTIN-96 cannot hold (not numeric, a leading zero, above 2^38-1), or None."""
    if isinstance(serials, PoolSerials):
        return "pool serials come from upstream and may be alphanumeric or have leading zeros"
    if isinstance(serials, RandomSerials):
        if not serials.alphabet.isdigit() or not serials.alphabet.isascii():
            return f"random serials of alphabet {serials.alphabet!r} may hold non-digits"
        if "0" in serials.alphabet and serials.length > 1:
            return "random serials may start with 0 (the alphabet has 0), a leading zero SGTIN-96 cannot keep"
        if int(max(serials.alphabet) * serials.length) > SGTIN96_MAX_SERIAL:
            return f"random serials of {serials.length} digits go above {SGTIN96_MAX_SERIAL}, the largest SGTIN-96 serial"
        return None
    if serials.width > 1 and serials.start < 10 ** (serials.width - 1):
        return f"sequential serials zero-padded to width {serials.width} start with a leading zero"
    if serials.start > SGTIN96_MAX_SERIAL:
        return f"sequential serials start above {SGTIN96_MAX_SERIAL}, the largest SGTIN-96 serial"
    return None


# --------------------------------------------------------------------------- store, MQTT


class StoreConfig(Model):
    path: str = "linectl.db"
    retention_days: float = Field(90.0, gt=0, description="forwarded events older than this may be purged")
    group_commit_max: int = Field(2000, gt=0, description="most operations in one transaction")
    queue_max: int = Field(50_000, gt=0, description="bound of the writer's queue; producers wait when full")


class TlsConfig(Model):
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    insecure: bool = False


class MqttConfig(Model):
    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = Field(1883, ge=1, le=65535)
    username: str | None = None
    password: str | None = Field(None, description="prefer password_env or password_file: a password in the YAML travels with every copy of it")
    password_env: str | None = Field(None, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$", description="environment variable holding the broker password")
    password_file: str | None = Field(
        None, min_length=1, description="file holding the broker password (first line); refused when group or others may read it")
    tls: TlsConfig | None = None
    client_id: str | None = None
    topic_root: str | None = Field(None, description="default: <enterprise>/<site>/<area>/<line>")
    protocol: Literal["3.1.1", "5"] = "5"
    keepalive_s: int = Field(30, ge=5)
    max_events_per_message: int = Field(500, gt=0)
    max_bytes_per_message: int = Field(256_000, ge=4096)
    epc_format: Literal["urn", "digital_link"] = "urn"
    state_interval_s: float = Field(2.0, gt=0)
    max_command_bytes: int = Field(1_000_000, gt=0)
    authorized_origins: list[str] = Field(default_factory=list, description="if set, only these command origins are accepted")
    delivery_confirm: Literal["puback", "upstream"] = Field(
        "puback",
        description="when an outbox row counts as delivered: the broker's PUBACK, or the consumer's confirmation on <root>/confirm",
    )
    confirm_timeout_s: float = Field(
        60.0, gt=0, le=3600, description="delivery_confirm=upstream: resend from the first unconfirmed message after this long"
    )
    backlog_alarm_s: float = Field(600.0, gt=0, le=30 * 86_400, description="alarm when the oldest event not yet forwarded (PUBACK or "
                                   "confirmation) is older than this")
    command_session_expiry_s: int = Field(
        60,
        ge=0,
        le=3600,
        description="MQTT 5: the broker keeps the command subscription and queues commands this long while the bridge "
        "is disconnected (0 = clean session); MQTT 3.1.1 sessions are always clean",
    )

    @model_validator(mode="after")
    def _one_password(self) -> MqttConfig:
        given = [k for k in ("password", "password_env", "password_file") if getattr(self, k) is not None]
        if len(given) > 1:
            raise ValueError(f"give the broker password one way, not {' and '.join(given)}")
        return self


class FileSinkConfig(Model):
    """`upstream.file`: EPCIS 2.0 documents written atomically into a directory that a transfer gateway empties."""

    dir: str = Field(min_length=1, description="directory the documents are written into (must exist; it is not created)")
    max_events: int = Field(500, gt=0, le=100_000, description="most EPCIS events per document (a row's events are never split over two)")
    max_age_s: float = Field(
        5.0, gt=0, le=86_400, description="a document with fewer events is written once its first event was stored this long ago"
    )
    prefix: str | None = Field(
        None, pattern=r"^[A-Za-z0-9_-][A-Za-z0-9_.-]{0,63}$", description="file name prefix: <prefix>-<first_seq>-<last_seq>.json; default: line.name"
    )
    backlog_alarm_s: float = Field(600.0, gt=0, le=30 * 86_400, description="alarm when the oldest undelivered event is older than this")


class AlreadyCapturedMatcher(Model):
    """`upstream.epcis_xml[].already_captured`: the answer of a repository that refuses a document because it already
    holds one of its events (QU4RTET: HTTP 500 naming the EPC whose commissioning it has). Such an answer to a re-send
    is not an error: see linectl.upstream.epcis_xml for what the sink concludes from it."""

    status: list[int] = Field(default_factory=lambda: [500], min_length=1, description="HTTP status codes this answer comes with")
    body_regex: str = Field(min_length=1, description="regex searched in the response body; a named group (?P<epc>...) names the EPC")
    split: bool = Field(
        True, description="when the named EPC is not commissioned by this document (or none is named): bisect the document and "
        "send the halves, so only the events already held are skipped; false: park the document (4xx-like)"
    )

    @field_validator("body_regex")
    @classmethod
    def _compiles(cls, v: str) -> str:
        try:
            re.compile(v)
        except re.error as exc:
            raise ValueError(f"body_regex is not a valid regular expression: {exc}") from None
        return v


class EpcisXmlSinkConfig(Model):
    """`upstream.epcis_xml[]`: EPCIS 1.2 (or 2.0) XML documents POSTed to a capture endpoint or written into a directory."""

    name: str = Field(pattern=r"^[a-z0-9_-]{1,32}$", description="unique; the sink's cursor is epcis_xml:<name>")
    version: Literal["1.2", "2.0"] = "1.2"
    url: str | None = Field(None, pattern=r"^https?://", description="HTTP capture endpoint (POST); exactly one of url and dir")
    dir: str | None = Field(None, min_length=1, description="directory the documents are written into (must exist); exactly one of url and dir")
    prefix: str | None = Field(None, pattern=r"^[A-Za-z0-9_-][A-Za-z0-9_.-]{0,63}$", description="file name prefix (dir); default: line.name")
    auth: Literal["none", "basic", "bearer"] = "none"
    username: str | None = Field(None, min_length=1, description="basic auth user")
    secret_env: str | None = Field(None, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$", description="env var holding the basic password or bearer token")
    secret_file: str | None = Field(None, min_length=1, description="file holding the basic password or bearer token (trailing newline stripped)")
    token_scheme: str = Field("Bearer", pattern=r"^[A-Za-z][A-Za-z0-9_-]*$", description="bearer auth scheme word (DRF TokenAuthentication: Token)")
    ca_file: str | None = Field(None, min_length=1, description="CA bundle for the server's certificate (default: system CAs)")
    client_cert: str | None = Field(None, min_length=1, description="PEM client certificate (TLS client auth)")
    client_key: str | None = Field(None, min_length=1, description="PEM key of client_cert (when not inside client_cert)")
    timeout_s: float = Field(30.0, gt=0, le=600)
    headers: dict[str, str] = Field(default_factory=dict, description="extra request headers (no Authorization: secrets never live in YAML)")
    success_codes: list[int] = Field(default_factory=lambda: [200, 201, 202, 204], min_length=1)
    already_captured: AlreadyCapturedMatcher | None = None
    retry_4xx_s: float = Field(300.0, gt=0, le=86_400, description="a refused (4xx) document is parked and retried after this long")
    max_events: int = Field(500, gt=0, le=100_000, description="most EPCIS events per document (a row's events are never split over two)")
    max_age_s: float = Field(5.0, gt=0, le=86_400, description="a document with fewer events goes once its first event was stored this long ago")
    backlog_alarm_s: float = Field(600.0, gt=0, le=30 * 86_400, description="alarm when the oldest undelivered event is older than this")

    @model_validator(mode="after")
    def _coherent(self) -> EpcisXmlSinkConfig:
        if (self.url is None) == (self.dir is None):
            raise ValueError(f"epcis_xml {self.name}: exactly one of url (HTTP capture) and dir (directory) is required")
        http_only = {"auth": self.auth != "none", "username": self.username, "secret_env": self.secret_env, "secret_file": self.secret_file,
                     "ca_file": self.ca_file, "client_cert": self.client_cert, "client_key": self.client_key, "headers": self.headers,
                     "already_captured": self.already_captured}
        if self.dir is not None:
            used = [k for k, v in http_only.items() if v]
            if used:
                raise ValueError(f"epcis_xml {self.name}: {', '.join(used)} only apply to url (HTTP), not to dir")
        elif self.prefix is not None:
            raise ValueError(f"epcis_xml {self.name}: prefix only applies to dir")
        if self.secret_env and self.secret_file:
            raise ValueError(f"epcis_xml {self.name}: secret_env or secret_file, not both")
        has_secret = bool(self.secret_env or self.secret_file)
        if self.auth == "basic" and not (self.username and has_secret):
            raise ValueError(f"epcis_xml {self.name}: auth basic needs username and secret_env or secret_file")
        if self.auth == "bearer" and not has_secret:
            raise ValueError(f"epcis_xml {self.name}: auth bearer needs secret_env or secret_file")
        if self.auth != "basic" and self.username:
            raise ValueError(f"epcis_xml {self.name}: username is only for auth basic")
        if self.auth == "none" and has_secret:
            raise ValueError(f"epcis_xml {self.name}: a secret is given but auth is none")
        if any(h.lower() in ("authorization", "proxy-authorization") for h in self.headers):
            raise ValueError(f"epcis_xml {self.name}: credentials never go into headers (the YAML); use auth with secret_env/secret_file")
        if self.client_key and not self.client_cert:
            raise ValueError(f"epcis_xml {self.name}: client_key needs client_cert")
        return self


class EpcisRestSinkConfig(Model):
    """`upstream.epcis_rest[]`: one EPCIS 2.0 repository reached over its REST capture interface (POST /capture).

    Secrets never sit in the YAML: the password (basic) or token (bearer) comes from `secret_env` or `secret_file`."""

    name: str = Field(pattern=r"^[a-z0-9_-]{1,32}$", description="the sink's name: its cursor is `epcis_rest:<name>`")
    url: str = Field(pattern=r"^https?://[^\s/]+(/\S*)?$", description="base URL of the repository (the capture endpoint is <url>/capture)")
    auth: Literal["none", "basic", "bearer"] = "none"
    username: str | None = Field(None, min_length=1, description="auth basic: the user name")
    secret_env: str | None = Field(None, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$", description="environment variable holding the password or token")
    secret_file: str | None = Field(None, min_length=1, description="file holding the password or token (read at each connect)")
    client_cert: str | None = Field(None, min_length=1, description="PEM client certificate (with its key, or see client_key)")
    client_key: str | None = Field(None, min_length=1, description="PEM key of client_cert when it is a separate file")
    ca_file: str | None = Field(None, min_length=1, description="PEM CA bundle the repository's certificate is checked against")
    timeout_s: float = Field(30.0, gt=0, le=600, description="one HTTP request's timeout")
    max_events: int = Field(1000, gt=0, le=100_000, description="most events per document (the repository's GS1-EPCIS-Capture-Limit caps it)")
    max_bytes: int = Field(
        4 * 1024 * 1024, ge=4096, le=1024**3, description="largest document in bytes (GS1-EPCIS-Capture-File-Size-Limit caps it)"
    )
    max_age_s: float = Field(1.0, gt=0, le=3600, description="a document with fewer events goes once its first event was stored this long ago")
    inflight: int = Field(4, ge=1, le=32, description="documents in flight at once (1: the repository captures in outbox order)")
    job_timeout_s: float = Field(300.0, gt=0, le=86_400, description="a capture job still running after this long is sent again")
    backlog_alarm_s: float = Field(600.0, gt=0, le=30 * 86_400, description="alarm when the oldest undelivered event is older than this")
    catchup_max_rate: float | None = Field(
        10_000.0, gt=0, le=1_000_000,
        description="during a catch-up, most backlog events per second sent (null: unpaced); the line's live lane is never paced",
    )

    @model_validator(mode="after")
    def _auth(self) -> EpcisRestSinkConfig:
        if self.auth == "none" and (self.username or self.secret_env or self.secret_file):
            raise ValueError("auth none takes no username, secret_env or secret_file")
        if self.auth != "none" and (self.secret_env is None) == (self.secret_file is None):
            raise ValueError(f"auth {self.auth} needs exactly one of secret_env, secret_file")
        if (self.auth == "basic") != (self.username is not None):
            raise ValueError("username goes with auth basic, and auth basic needs it")
        if self.client_key and not self.client_cert:
            raise ValueError("client_key without client_cert")
        if (self.client_cert or self.ca_file) and not self.url.startswith("https://"):
            raise ValueError("client_cert/ca_file need an https:// url")
        return self


class UpstreamConfig(Model):
    """Upstream sinks besides MQTT (which `mqtt:` configures); each keeps its own cursor in the store."""

    file: FileSinkConfig | None = None
    epcis_xml: list[EpcisXmlSinkConfig] = Field(default_factory=list)

    @field_validator("epcis_xml")
    @classmethod
    def _unique_names(cls, v: list[EpcisXmlSinkConfig]) -> list[EpcisXmlSinkConfig]:
        names = [s.name for s in v]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"epcis_xml sink names must be unique: {', '.join(dup)} repeated")
        return v

    epcis_rest: list[EpcisRestSinkConfig] = Field(default_factory=list, description="EPCIS 2.0 REST repositories, one sink each")

    @field_validator("epcis_rest")
    @classmethod
    def _unique_rest_names(cls, v: list[EpcisRestSinkConfig]) -> list[EpcisRestSinkConfig]:
        names = [s.name for s in v]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"epcis_rest names must be unique: {', '.join(dup)} more than once (each name is a cursor)")
        return v


# --------------------------------------------------------------------------- stations


class VerifyRules(Model):
    """Stop rules: each one stops the line with an alarm naming it."""

    consecutive_reject_limit: int = Field(5, ge=1)
    no_read_limit: int = Field(3, ge=1, description="consecutive no-reads that stop the line")
    reject_confirm_timeout_s: float = Field(
        2.0, gt=0, description="floor of the wait for the gate's reject confirm; with read_to_gate_units the wait grows with the line's pace"
    )
    read_to_gate_units: int | None = Field(
        None, ge=1, le=10_000,
        description="product pitches from the read point to the reject gate; the confirm wait is at least 1.5x the time "
        "that many units take at the line's pace",
    )
    link_grace_s: float = Field(
        0.0, ge=0, le=30,
        description="a printer link down for less than this (reconnecting) does not stop the line while the printer still holds codes; 0 = stop at once",
    )
    read_timeout_s: float = Field(3.0, gt=0, description="printed units but no read for this long: reader is silent, stop")
    drain_timeout_s: float = Field(5.0, gt=0, description="at stop, how long units on the belt may take to reach reader and gate")
    require_gs1: bool = True
    check_grade: bool = True
    rfid_void_limit: int = Field(
        3, ge=1, le=1000,
        description="print_verify with an RFID product: this many units in a row whose tag the printer VOIDed stop the line",
    )


#: rules about reading the printed code: refused on a print_verify station without a reader (carrier rfid only)
READ_RULES = ("no_read_limit", "read_timeout_s", "require_gs1", "check_grade")


class PrintVerifyStation(Model):
    type: Literal["print_verify"]
    name: str = Field(pattern=r"^[A-Za-z0-9_-]+$")
    gln_extension: str | None = Field(
        None, pattern=_SGLN_EXTENSION, description="SGLN extension of this station's EPCIS readPoint; default: the station name"
    )
    printer: str
    reader: str | None = Field(
        None, description="reader/camera of the printed code; none only for a line whose products are all carrier rfid "
        "(the RFID printer's read-back of each tag is then the verification)",
    )
    plc: str
    printer_queue_depth: int = Field(
        4, ge=1, le=1024,
        description="codes kept on the printer ahead of the trigger; with printer_queue_s: the most codes it may hold",
    )
    printer_queue_s: float | None = Field(
        None, gt=0, le=60,
        description="seconds of line time to keep queued on the printer (depth = this x the line's pace, at most printer_queue_depth)",
    )
    rate_upm: float | None = Field(
        None, gt=0, le=100_000,
        description="the line's nominal rate (units/min): sizes printer_queue_s and the confirm wait until the achieved pace is measured",
    )
    rules: VerifyRules = Field(default_factory=VerifyRules)

    @model_validator(mode="after")
    def _read_rules(self) -> PrintVerifyStation:
        if self.reader is None:
            given = [k for k in READ_RULES if k in self.rules.model_fields_set]
            if given:
                raise ValueError(f"rules.{', rules.'.join(given)} are about reading the printed code: this station has no reader")
        return self

    @model_validator(mode="after")
    def _queue(self) -> PrintVerifyStation:
        if self.printer_queue_s is None:
            return self
        if self.rate_upm is None:
            raise ValueError("printer_queue_s needs rate_upm (the nominal rate that sizes the queue before the pace is measured)")
        need = queue_depth_for(self.printer_queue_s, self.rate_upm)
        if "printer_queue_depth" in self.model_fields_set and need > self.printer_queue_depth:
            raise ValueError(
                f"printer_queue_s {self.printer_queue_s:g} at rate_upm {self.rate_upm:g} needs {need} codes on the printer, "
                f"but printer_queue_depth bounds it to {self.printer_queue_depth}: raise the bound or lower printer_queue_s"
            )
        return self

    @property
    def queue_bound(self) -> int:
        """Most codes on the printer: printer_queue_depth as set, or, with printer_queue_s alone, IMPLICIT_QUEUE_BOUND."""
        if self.printer_queue_s is not None and "printer_queue_depth" not in self.model_fields_set:
            return IMPLICIT_QUEUE_BOUND
        return self.printer_queue_depth


#: the most codes printer_queue_s may keep on a printer when printer_queue_depth does not bound it
IMPLICIT_QUEUE_BOUND = 256


def queue_depth_for(queue_s: float, rate_upm: float) -> int:
    """Codes that cover queue_s of line time at rate_upm (at least 2: one printing, one next)."""
    import math

    return max(2, math.ceil(queue_s * rate_upm / 60.0))


class VerifyStation(Model):
    """Reads codes printed elsewhere and checks each against the store (linectl/engine/verify_station.py)."""

    type: Literal["verify"]
    name: str = Field(pattern=r"^[A-Za-z0-9_-]+$")
    gln_extension: str | None = Field(
        None, pattern=_SGLN_EXTENSION, description="SGLN extension of this station's EPCIS readPoint; default: the station name"
    )
    reader: str = Field(description="reader, scanner or camera that reads each unit; or an RFID reader (driver: llrp, trigger: continuous)")
    plc: str | None = Field(
        None, description="PLC of a reject gate: a verdict per unit in its verdict_ring, rejects confirmed from reject_ring"
    )
    rfid_min_rssi: int | None = Field(
        None, ge=-128, le=0,
        description="RFID reader only: tags reported weaker than this (dBm) are outside the read zone: counted as strays, not verified",
    )
    rules: VerifyRules = Field(default_factory=VerifyRules)

    @model_validator(mode="after")
    def _rules_that_apply(self) -> VerifyStation:
        """A rule this station cannot apply is refused, not silently ignored."""
        for k in ("link_grace_s", "rfid_void_limit"):
            if k in self.rules.model_fields_set:
                raise ValueError(f"rules.{k} is about a printer; a verify station prints nothing")
        if self.plc is None:
            gated = [k for k in ("reject_confirm_timeout_s", "read_to_gate_units", "read_timeout_s", "drain_timeout_s")
                     if k in self.rules.model_fields_set]
            if gated:
                raise ValueError(f"rules.{', rules.'.join(gated)} need a reject gate: set plc (the PLC of the gate)")
        return self


class CaseStation(Model):
    type: Literal["case"]
    name: str = Field(pattern=r"^[A-Za-z0-9_-]+$")
    gln_extension: str | None = Field(
        None, pattern=_SGLN_EXTENSION, description="SGLN extension of this station's EPCIS readPoint; default: the station name"
    )
    reader: str
    printer: str
    label_reader: str | None = None
    plc: str | None = Field(
        None, description="PLC of the case reject pusher: every decision is written to its case_result, then case_seq"
    )
    units_per_case: int = Field(gt=0, le=10_000)
    sscc_extension: int = Field(0, ge=0, le=9)
    window_ms: int | None = Field(
        None, ge=10, le=60_000,
        description="RFID tunnel only: inventory window per case, opened when the PLC's case_trigger counts a case; "
        "default the reader's window_ms",
    )
    rfid_min_rssi: int | None = Field(
        None, ge=-128, le=0,
        description="RFID tunnel only: tags reported weaker than this (dBm) are strays from outside the case: excluded and reported",
    )


class PalletStation(Model):
    type: Literal["pallet"]
    name: str = Field(pattern=r"^[A-Za-z0-9_-]+$")
    gln_extension: str | None = Field(
        None, pattern=_SGLN_EXTENSION, description="SGLN extension of this station's EPCIS readPoint; default: the station name"
    )
    reader: str
    printer: str
    label_reader: str | None = None
    cases_per_pallet: int = Field(gt=0, le=1000)
    sscc_extension: int = Field(1, ge=0, le=9)


class ReworkStation(Model):
    type: Literal["rework"]
    name: str = Field(pattern=r"^[A-Za-z0-9_-]+$")
    gln_extension: str | None = Field(
        None, pattern=_SGLN_EXTENSION, description="SGLN extension of this station's EPCIS readPoint; default: the station name"
    )
    scanner: str
    printer: str | None = None


StationConfig = Annotated[
    PrintVerifyStation | VerifyStation | CaseStation | PalletStation | ReworkStation,
    Field(discriminator="type"),
]

if TYPE_CHECKING:
    # the union is built at run time from the driver registry; to the type checker a device is a DriverConfig
    DeviceConfig = DriverConfig
else:
    _DEVICE_CLASSES = device_config_classes()
    if len(_DEVICE_CLASSES) == 1:
        DeviceConfig = _DEVICE_CLASSES[0]
    else:
        DeviceConfig = Annotated[Union[tuple(_DEVICE_CLASSES)], Field(discriminator="driver")]  # noqa: UP007 - a run-time union


class EpcisConfig(Model):
    """What the line tells upstream in EPCIS, beyond the fixed mapping (README "EPCIS 2.0 mapping")."""

    rejected_serials: Literal["omit", "commission_then_decommission"] = Field(
        "omit",
        description="a serial printed on a pack that was rejected before it was ever commissioned: no EPCIS event "
        "(omit; it travels as a record) or a commissioning + decommissioning pair",
    )


ChallengeKind = Literal["no_code", "wrong_code", "duplicate", "not_gs1", "low_grade"]
DEFAULT_CHALLENGE: tuple[ChallengeKind, ...] = ("no_code", "wrong_code", "duplicate")


class BatchDefaults(Model):
    unused_serials: Literal["return", "void"] = "return"
    challenge: list[ChallengeKind] = Field(default_factory=lambda: list(DEFAULT_CHALLENGE))


class PackmlConfig(Model):
    """The line seen as a PackML unit (linectl/engine/packml.py; README "PackML")."""

    mach_speed_upm: float = Field(0.0, ge=0, le=100_000, description="PackTags MachSpeed: the line's speed setpoint, units/min")
    starved_after_s: float = Field(
        10.0, ge=0, le=3600, description="a running batch with its infeed open and no unit for this long is Starved (Suspended); 0 = never"
    )
    publish_interval_s: float = Field(
        1.0, gt=0, le=3600, description="how often the MQTT bridge checks PackTags for a change (speed, Starved) between state changes"
    )


class ShiftConfig(Model):
    """Shift boundaries for the shift counters in `<root>/state` (README "Operators' view: the state message")."""

    starts: list[str] = Field(
        default_factory=lambda: ["00:00"],
        min_length=1,
        max_length=24,
        description='local start times "HH:MM" (line.timezone) of the shifts; a shift runs until the next start; default one shift a day',
    )
    names: list[str] | None = Field(None, description="a name per start, same order and count; default the start time itself")

    @field_validator("starts")
    @classmethod
    def _starts(cls, v: list[str]) -> list[str]:
        for s in v:
            if not re.fullmatch(r"([01]\d|2[0-3]):[0-5]\d", s):
                raise ValueError(f"shift start {s!r} is not a time HH:MM (00:00 to 23:59)")
        if v != sorted(set(v)):
            raise ValueError(f"shift starts {v} must be in order of the day, without repeats (shift.names follows that order)")
        return v

    @model_validator(mode="after")
    def _names(self) -> ShiftConfig:
        if self.names is not None:
            if len(self.names) != len(self.starts):
                raise ValueError(f"shift.names has {len(self.names)} names for {len(self.starts)} starts: give one per start")
            if any(not n.strip() for n in self.names):
                raise ValueError("shift names must not be empty")
        return self


# --------------------------------------------------------------------------- OPC UA server (PackML)

#: OPC UA security policies the server may offer (asyncua's SecurityPolicyType names); "None" only via allow_unsecured
OpcuaSecurity = Literal[
    "Basic256Sha256_SignAndEncrypt", "Basic256Sha256_Sign", "Aes128Sha256RsaOaep_SignAndEncrypt", "Aes128Sha256RsaOaep_Sign",
    "Aes256Sha256RsaPss_SignAndEncrypt", "Aes256Sha256RsaPss_Sign",
]


class OpcuaUser(Model):
    """One OPC UA user: the password only as an argon2 hash (`linectl opcua hash-password`)."""

    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.@-]+$")
    password_hash: str = Field(description="argon2 hash, as printed by `linectl opcua hash-password`")
    role: Literal["operator", "viewer"] = Field("viewer", description="operator: may call the PackML methods; viewer: browse and read only")

    @field_validator("password_hash")
    @classmethod
    def _argon2(cls, v: str) -> str:
        if not re.fullmatch(r"\$argon2(id|i|d)\$v=\d+\$m=\d+,t=\d+,p=\d+\$[A-Za-z0-9+/]+\$[A-Za-z0-9+/]+", v):
            raise ValueError("password_hash must be an argon2 hash ($argon2id$v=19$m=...): make one with `linectl opcua hash-password`")
        return v


class OpcuaServerConfig(Model):
    """`opcua_server:` the line as a PackML unit (OPC 30050) for SCADA/MES clients. Secure unless the config says otherwise."""

    enabled: bool = False
    endpoint: str = Field("opc.tcp://0.0.0.0:4841/linectl", pattern=r"^opc\.tcp://[^/\s:]+:\d{1,5}(/\S*)?$")
    security: list[OpcuaSecurity] = Field(
        default_factory=lambda: list[OpcuaSecurity](["Basic256Sha256_SignAndEncrypt"]), min_length=1, description="secured endpoints offered"
    )
    allow_unsecured: bool = Field(
        False, description="also offer an endpoint with security policy None (nothing on it is signed or encrypted but the password)"
    )
    allow_anonymous: bool = Field(False, description="sessions without a user: browse and read only, never a method call")
    users: list[OpcuaUser] = Field(default_factory=list)
    certificate: str = Field("opcua/server_cert.der", description="server certificate (DER); generated with private_key on first start if missing")
    private_key: str = Field("opcua/server_key.pem", description="its private key (PEM), written mode 0600")
    trusted_clients_dir: str = Field("opcua/trusted", description="client certificates (DER/PEM) trusted for secured endpoints; created empty")
    application_uri: str = Field("urn:linectl:opcua-server", min_length=1)
    publish_interval_s: float = Field(1.0, ge=0.05, le=60, description="PackTags refreshed at least this often; on a state change at once")

    @model_validator(mode="after")
    def _users(self) -> OpcuaServerConfig:
        names = [u.name for u in self.users]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"opcua_server.users: {', '.join(dup)} listed twice")
        if len(set(self.security)) != len(self.security):
            raise ValueError("opcua_server.security lists a policy twice")
        return self


#: commands that must carry a reason unless the line's config says otherwise (Annex 11 §9: the reason for a change)
DEFAULT_REASON_REQUIRED = ("recall_batch", "reconcile_units")
#: what may be listed besides the engine commands: changes the CLI makes on the store itself
CLI_ACTIONS = ("serials_import",)
#: engine commands that change nothing (never audited as a change): a reason for them means nothing
_NOT_CHANGES = ("request_state", "verify_code")


class AuditConfig(Model):
    """What the audit trail demands of the people who change GMP data (README "Audit trail and batch review")."""

    reason_required: list[str] = Field(
        default_factory=lambda: list(DEFAULT_REASON_REQUIRED),
        description="commands refused (code reason_required) unless they give a reason: engine command names "
        "(stop_batch, close_batch, ...) and serials_import",
    )

    @field_validator("reason_required")
    @classmethod
    def _known(cls, v: list[str]) -> list[str]:
        from linectl.control import COMMAND_NAMES

        known = [n for n in COMMAND_NAMES if n not in _NOT_CHANGES] + list(CLI_ACTIONS)
        bad = [n for n in v if n not in known]
        if bad:
            raise ValueError(f"unknown command(s) {', '.join(map(repr, bad))}; known: {', '.join(known)}")
        if len(set(v)) != len(v):
            raise ValueError("a command is listed twice")
        return v


class LineConfig(Model):
    line: LineIdentity
    products: list[Product] = Field(min_length=1)
    store: StoreConfig = Field(default_factory=StoreConfig)
    mqtt: MqttConfig = Field(default_factory=MqttConfig)
    upstream: UpstreamConfig = Field(default_factory=UpstreamConfig)
    batch: BatchDefaults = Field(default_factory=BatchDefaults)
    epcis: EpcisConfig = Field(default_factory=EpcisConfig)
    devices: dict[str, DeviceConfig] = Field(default_factory=dict)
    stations: list[StationConfig] = Field(default_factory=list)
    packml: PackmlConfig = Field(default_factory=PackmlConfig)
    shift: ShiftConfig = Field(default_factory=ShiftConfig)
    opcua_server: OpcuaServerConfig = Field(default_factory=OpcuaServerConfig)
    audit: AuditConfig = Field(default_factory=AuditConfig)
    #: who may command the line (linectl/access); the section absent: access control off, said loudly at start
    access: AccessConfig = Field(default_factory=lambda: AccessConfig.model_validate(ACCESS_DISABLED))
    # The simulator's own section, kept as a mapping: the controller must not import (or need) the simulators, so the
    # section is validated by what uses it (`linectl simulate`, `demo`, and `check-config` when it is present) against
    # linectl.simulators.config.SimulationConfig.
    simulation: dict[str, Any] | None = Field(None, description="line simulator settings; ignored by `linectl run`")
    #: (path, sha256 of the file's bytes) when loaded from a file by load_config (linectl.config_hash)
    _source: tuple[str, str] | None = PrivateAttr(default=None)

    @property
    def source(self) -> tuple[str, str] | None:
        """(path, sha256 of its bytes as read) of the file this config was loaded from; None when built from data."""
        return self._source

    def product(self, gtin: str) -> Product:
        g = gs1.normalize_gtin(gtin)
        for p in self.products:
            if p.gtin == g:
                return p
        raise KeyError(f"GTIN {gtin} is not configured on this line")

    @property
    def topic_root(self) -> str:
        return self.mqtt.topic_root or self.line.topic_root

    def station_read_points(self) -> dict[str, str]:
        """Station name -> the SGLN of its EPCIS readPoint (line GLN + the station's `gln_extension`, default its name)."""
        return {st.name: self.line.sgln_with(st.gln_extension or st.name) for st in self.stations}


def _reference_problems(cfg: LineConfig) -> list[tuple[tuple[Any, ...], str]]:
    """Cross-references pydantic cannot see: station -> device names and roles, unique names and GTINs."""
    from linectl.drivers.registry import role_of
    from linectl.engine.station import UnknownStationType, builder

    out: list[tuple[tuple[Any, ...], str]] = []
    seen_gtin: dict[str, int] = {}
    for i, p in enumerate(cfg.products):
        if p.gtin in seen_gtin:
            out.append((("products", i, "gtin"), f"GTIN {p.gtin} is configured twice (also products.{seen_gtin[p.gtin]})"))
        seen_gtin[p.gtin] = i
    ua = cfg.opcua_server
    if ua.enabled and cfg.access.enabled and ua.users:
        out.append((("opcua_server", "users"), "with access: on, OPC UA sessions log in as the store's users (linectl users add): "
                    "remove opcua_server.users (they are for a line without access control)"))
    elif ua.enabled and not cfg.access.enabled and not ua.users and not ua.allow_anonymous:
        out.append((("opcua_server", "users"), "opcua_server is enabled but has no users (and allow_anonymous is false, and no "
                    "access: section whose users could log in): nobody could connect"))
    for key in cfg.access.devices:
        dev = cfg.devices.get(key.split(":", 1)[1])
        if dev is None or role_of(dev.driver) != "plc":
            out.append((("access", "devices", key), f"{key}: no PLC device {key.split(':', 1)[1]!r} in devices"))
    names: set[str] = set()
    extensions: dict[str, str] = {}
    for i, st in enumerate(cfg.stations):
        if st.name in names:
            out.append((("stations", i, "name"), f"station name {st.name!r} is used twice"))
        names.add(st.name)
        try:
            builder(st.type)  # a type the config accepts but this linectl cannot run is refused here, not at start
        except UnknownStationType as exc:
            out.append((("stations", i, "type"), str(exc)))
        ext = st.gln_extension or st.name
        if st.gln_extension is None and len(st.name) > 20:
            out.append((("stations", i, "name"), f"station name {st.name!r} is longer than 20 characters: set gln_extension "
                        "(its EPCIS readPoint SGLN extension, which defaults to the name)"))
        elif ext in extensions:
            out.append((("stations", i, "gln_extension"), f"SGLN extension {ext!r} is also station {extensions[ext]!r}'s: "
                        "each station needs its own EPCIS readPoint"))
        extensions.setdefault(ext, st.name)
        for fld, role in (("printer", "printer"), ("reader", "reader"), ("plc", "plc"), ("scanner", "reader"), ("label_reader", "reader")):
            ref = getattr(st, fld, None)
            if ref is None:
                continue
            if ref not in cfg.devices:
                out.append((("stations", i, fld), f"no device named {ref!r} (devices: {', '.join(sorted(cfg.devices)) or 'none'})"))
            elif fld == "reader" and isinstance(st, (CaseStation, VerifyStation)) and role_of(cfg.devices[ref].driver) == "rfid_reader":
                out.extend(_rfid_reader_problems(i, st, cfg))
            elif role_of(cfg.devices[ref].driver) != role:
                out.append((("stations", i, fld), f"device {ref!r} is a {role_of(cfg.devices[ref].driver)}, not a {role}"))
            elif isinstance(st, CaseStation) and fld == "plc":
                out.extend(_case_plc_problems(i, st, cfg.devices[ref]))
            elif isinstance(st, VerifyStation) and fld == "plc":
                out.extend(_gate_plc_problems(i, st.name, ref, cfg.devices[ref]))
                out.extend(_gate_reader_problems(i, st, cfg.devices.get(st.reader)))
        out.extend(_rfid_keys_problems(i, st, cfg))
        if isinstance(st, PrintVerifyStation):
            out.extend(_carrier_problems(cfg, i, st))
    return out


def _carrier_problems(cfg: LineConfig, i: int, st: PrintVerifyStation) -> list[tuple[tuple[Any, ...], str]]:
    """What each product's carrier needs of a print_verify station (every product may run on every station)."""
    from linectl.drivers.zpl import ZplConfig

    out: list[tuple[tuple[Any, ...], str]] = []
    dev = cfg.devices.get(st.printer)
    rfid = dev.rfid if isinstance(dev, ZplConfig) and dev.rfid is not None and dev.rfid.enabled else None
    for j, p in enumerate(cfg.products):
        where = ("products", j, "carrier")
        if p.rfid_carrier and rfid is None:
            out.append((where, f"product {p.gtin} has carrier {p.carrier}, but station {st.name!r} prints on {st.printer!r}, "
                        "which is not a ZPL printer with rfid.enabled: nothing would encode the tags"))
        if p.datamatrix_carrier and st.reader is None:
            out.append((where, f"product {p.gtin} has carrier {p.carrier}: its DataMatrix must be read back, but station "
                        f"{st.name!r} has no reader"))
        if not p.rfid_carrier and rfid is not None and rfid.require_epc:
            out.append((where, f"product {p.gtin} has carrier datamatrix (no tag), but printer {st.printer!r} refuses jobs "
                        "without an EPC (rfid.require_epc): set the product's carrier to rfid or both, or require_epc false"))
    if rfid is not None and any(p.rfid_carrier for p in cfg.products):
        plc_tags = getattr(cfg.devices.get(st.plc), "tags", None) or {}
        if "trigger_count" not in plc_tags:
            out.append((("stations", i, "plc"), f"station {st.name!r}: a ZPL printer has no product counter, so print_verify "
                        f"numbers its labels from the PLC's trigger count at each start; PLC {st.plc!r} maps no trigger_count tag"))
        if rfid.labels_per_format != 1:
            out.append((("devices", st.printer, "rfid", "labels_per_format"), f"station {st.name!r}: print_verify tracks one "
                        "label per unit and job; labels_per_format > 1 puts VOID labels of one job on several units"))
        if rfid.error_handling != "N":
            out.append((("devices", st.printer, "rfid", "error_handling"), f"station {st.name!r}: error_handling E leaves a "
                        "VOID label's format on the printer and its unit without a confirmation, which print_verify cannot "
                        "place on a unit; use N (each VOID is that unit's reject, rules.rfid_void_limit stops the line)"))
    if "rfid_void_limit" in st.rules.model_fields_set and not any(p.rfid_carrier for p in cfg.products):
        out.append((("stations", i, "rules", "rfid_void_limit"), "rules.rfid_void_limit: no product of this line has an RFID carrier"))
    return out


def _is_rfid(cfg: LineConfig, device: str | None) -> bool:
    from linectl.drivers.registry import role_of

    dev = cfg.devices.get(device) if device else None
    return dev is not None and role_of(dev.driver) == "rfid_reader"


def _rfid_keys_problems(i: int, st: Any, cfg: LineConfig) -> list[tuple[tuple[Any, ...], str]]:
    """RFID keys on a station whose reader reads barcodes would be silently ignored: refuse them."""
    if not isinstance(st, (CaseStation, VerifyStation)) or st.reader not in cfg.devices or _is_rfid(cfg, st.reader):
        return []
    keys = [k for k in ("window_ms", "rfid_min_rssi") if k in st.model_fields_set]
    return [(("stations", i, k), f"station {st.name!r}: {k} applies to an RFID reader (driver: llrp); reader {st.reader!r} "
             f"is a {cfg.devices[st.reader].driver}") for k in keys]


def _rfid_reader_problems(i: int, st: CaseStation | VerifyStation, cfg: LineConfig) -> list[tuple[tuple[Any, ...], str]]:
    """What an RFID reader needs at a station: a tunnel works in windows opened by the PLC, a verify reader streams."""
    from linectl.drivers.plc_tags import CASE_TRIGGER

    dev = cfg.devices[st.reader]
    trigger = getattr(dev, "trigger", None)
    if isinstance(st, VerifyStation):
        out: list[tuple[tuple[Any, ...], str]] = []
        if trigger != "continuous":
            out.append((("stations", i, "reader"), f"verify station {st.name!r}: RFID reader {st.reader!r} must run trigger: continuous "
                        "(each tag is verified as it is reported; README \"RFID: verify station\")"))
        if st.plc is not None:
            out.append((("stations", i, "plc"), f"verify station {st.name!r}: a reject gate takes its verdicts per unit sequence, which "
                        f"an RFID tag stream does not carry; with RFID reader {st.reader!r} set no plc"))
        return out
    if trigger != "window":
        return [(("stations", i, "reader"), f"case station {st.name!r}: RFID tunnel reader {st.reader!r} must run trigger: window "
                 "(one inventory window per case)")]
    if st.plc is None:
        return [(("stations", i, "plc"), f"case station {st.name!r}: an RFID tunnel needs the PLC that counts cases into it "
                 f"(tag {CASE_TRIGGER}): set plc")]
    plc = cfg.devices.get(st.plc)
    tags = getattr(plc, "tags", None) or {}
    if plc is not None and CASE_TRIGGER not in tags:
        return [(("stations", i, "plc"), f"case station {st.name!r}: PLC {st.plc!r} has no {CASE_TRIGGER} tag in its tag map "
                 "(the PLC adds 1 when a case enters the RFID tunnel; linectl reads that case's tags in one window)")]
    return []


def _gate_reader_problems(i: int, st: VerifyStation, dev: Any) -> list[tuple[tuple[Any, ...], str]]:
    """A gate's verdicts are per unit sequence: a reader that reports none would get every unit rejected fail-safe."""
    if dev is None:
        return []
    if dev.driver == "scanner" or (dev.driver == "reader" and "{seq}" not in getattr(dev, "line_format", "")):
        return [(("stations", i, "reader"), f"station {st.name!r}: reader {st.reader!r} reports no unit sequence ({{seq}}), "
                 "but the reject gate of plc " + repr(st.plc) + " takes its verdicts per unit sequence; use a reader whose "
                 "line_format has {seq}, or no plc")]
    return []


def _gate_plc_problems(i: int, station: str, plc: str, dev: Any) -> list[tuple[tuple[Any, ...], str]]:
    """A reject gate needs its verdict ring (linectl writes) and reject ring (the PLC confirms): refuse it at load."""
    tags = getattr(dev, "tags", None) or {}
    missing = [t for t in ("verdict_ring", "reject_ring") if t not in tags]
    if missing:
        return [(("stations", i, "plc"), f"station {station!r}: PLC {plc!r} has no {' / '.join(missing)} tag in its tag map "
                 "(a reject gate takes a verdict per unit from verdict_ring and confirms each reject in reject_ring)")]
    count = tags["verdict_ring"].count
    if count < 4 or count % 2:
        return [(("stations", i, "plc"), f"station {station!r}: PLC {plc!r} tag verdict_ring must be an array of 2*R elements (R >= 2)")]
    return []


def _case_plc_problems(i: int, st: CaseStation, dev: Any) -> list[tuple[tuple[Any, ...], str]]:
    """A case PLC that lacks the divert tags would let every rejected case ride on: refuse it at load."""
    from linectl.drivers.plc_tags import CASE_TAGS

    tags = getattr(dev, "tags", None)
    if tags is None:
        return [(("stations", i, "plc"), f"case station {st.name!r}: PLC {st.plc!r} (driver {dev.driver}) has no tag map for case_result / case_seq")]
    missing = [t for t in CASE_TAGS if t not in tags]
    if missing:
        return [(
            ("stations", i, "plc"),
            f"case station {st.name!r}: PLC {st.plc!r} has no {' / '.join(missing)} tag in its tag map "
            "(linectl writes each case decision there for the reject pusher: case_result 1 = accept, 2 = reject, then case_seq + 1)",
        )]
    return []


def parse_config(data: dict[str, Any], *, source: Any = None, file: str = "<config>") -> LineConfig:
    """Validate plain data; on failure raise ConfigFileError with every problem located."""
    problems: list[Problem] = []
    try:
        cfg = LineConfig.model_validate(data)
    except ValidationError as exc:
        for err in exc.errors(include_url=False):
            loc = _clean_loc(data, tuple(err["loc"]))
            msg = err["msg"]
            if msg.startswith("Value error, "):
                msg = msg[len("Value error, ") :]
            problems.append(Problem(dotted(loc), line_of(source, loc) if source is not None else 0, msg))
        raise ConfigFileError(file, problems) from None
    for loc, msg in _reference_problems(cfg):
        problems.append(Problem(dotted(loc), line_of(source, loc) if source is not None else 0, msg))
    if problems:
        raise ConfigFileError(file, problems)
    return cfg


def _clean_loc(data: Any, loc: tuple[Any, ...]) -> tuple[Any, ...]:
    """Drop the parts of a pydantic location that are not in the file (union tags, validator names)."""
    out: list[Any] = []
    node = data
    for part in loc:
        if isinstance(node, dict) and part in node:
            out.append(part)
            node = node[part]
        elif isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node):
            out.append(part)
            node = node[part]
        elif isinstance(node, dict) and part in {str(node.get(k)) for k in ("driver", "type", "scheme") if k in node}:
            continue
        elif isinstance(part, str) and part.startswith("function-"):
            continue
        else:
            out.append(part)  # a missing or unknown key: still worth naming
            node = None
    return tuple(out)


def load_config(path: str | os.PathLike[str], env: dict[str, str] | None = None) -> LineConfig:
    """Load, substitute ${ENV}, validate. Raises ConfigFileError listing every problem with its line."""
    raw = read_config_bytes(path)
    source = parse_yaml(raw, path)
    env_problems = substitute_env(source, env)
    try:
        cfg = parse_config(to_plain(source), source=source, file=str(path))
    except ConfigFileError as exc:
        raise ConfigFileError(path, sorted(env_problems + exc.problems, key=lambda p: p.line)) from None
    if env_problems:
        raise ConfigFileError(path, env_problems)
    cfg._source = (os.fspath(path), hashlib.sha256(raw).hexdigest())
    return cfg
