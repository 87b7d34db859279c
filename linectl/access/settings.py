"""`access:` in the line config: roles and their commands, password policy, lockout, sessions, device actors, LDAP.

The section absent: access control is off (every command anonymous, as before linectl had users) and the daemon
says so loudly at start. The section present: `enabled` defaults to true, and the example configs all have it.
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from linectl.control import COMMAND_NAMES, USERNAME_PATTERN

ROLE_NAMES = ("operator", "supervisor", "qa", "engineer", "administrator", "l3")
#: the role of a service account through which the plant's L3 answers the line's serial requests over MQTT (never a
#: person's role: a user with it has no other role and cannot sign; README "Electronic signatures")
SERVICE_ROLE = "l3"
_READ = ("request_state", "verify_code")
_OPERATOR = (*_READ, "create_batch", "start_batch", "pause_batch", "resume_batch", "stop_batch", "challenge", "ack_alarm", "reset",
             "close_case", "rework_mode", "packml_command")
#: what each role may do by default (command names of linectl.control); `access.roles.<role>` replaces a role's list
DEFAULT_ROLES: dict[str, tuple[str, ...]] = {
    "operator": _OPERATOR,
    "supervisor": (*_OPERATOR, "close_batch", "provision_pool", "serials_retry", "sink_retry", "rework", "reconcile_units", "set_unit_mode"),
    "qa": (*_READ, "stop_batch", "close_batch", "rework", "reconcile_units", "recall_batch", "ack_alarm", "sign_review"),
    "engineer": (*_READ, "pause_batch", "resume_batch", "stop_batch", "challenge", "ack_alarm", "reset", "set_unit_mode",
                 "packml_command", "provision_pool", "serials_retry", "sink_retry"),
    # separation of duties: who administers users does not run production
    "administrator": (*_READ, "users_admin"),
    # the L3's service account: answers to the line's own serial requests (unsigned only as such an answer)
    SERVICE_ROLE: ("provision_pool",),
}
#: a PLC not listed under access.devices: what its command tags and PackML handshake can ask (never close, never users)
DEFAULT_DEVICE_PERMISSIONS = ("request_state", "start_batch", "pause_batch", "resume_batch", "stop_batch", "reset", "packml_command",
                              "set_unit_mode")
DEVICE_PATTERN = r"^plc:[A-Za-z0-9_-]+$"


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _commands(v: list[str], where: str) -> list[str]:
    unknown = [c for c in v if c not in COMMAND_NAMES]
    if unknown:
        raise ValueError(f"{where}: unknown command {', '.join(map(repr, unknown))}; known: {', '.join(COMMAND_NAMES)}")
    return sorted(set(v))


class PasswordPolicy(_Model):
    """21 CFR 11.300(b): passwords checked and aged."""

    min_length: int = Field(12, ge=8, le=128)
    classes: int = Field(3, ge=1, le=4, description="how many of lower case, upper case, digits, other characters it must have")
    max_age_days: int = Field(90, ge=0, le=3650, description="a password older than this is refused at login (0: never expires)")
    history: int = Field(5, ge=0, le=24, description="a new password may not be one of the last n")


class Lockout(_Model):
    """21 CFR 11.300(d): repeated wrong passwords lock the account."""

    attempts: int = Field(5, ge=1, le=100, description="wrong passwords in a row that lock the user")
    lock_minutes: int = Field(30, ge=0, le=525600, description="how long; 0: until an administrator unlocks")


class LdapConfig(_Model):
    """Directory login: a simple bind as the user, then the user's groups map to roles."""

    url: str = Field(pattern=r"^ldaps?://[^/\s]+$", description="ldap://host:389 or ldaps://host:636")
    bind_dn_template: str = Field(description="the user's DN, {username} replaced (escaped): uid={username},ou=people,dc=example,dc=com")
    start_tls: bool = Field(False, description="StartTLS on an ldap:// connection")
    ca_file: str | None = Field(None, description="CA certificate(s) (PEM) the server's certificate is checked against (TLS)")
    group_search_base: str = Field(min_length=1)
    group_filter: str = Field("(&(objectClass=groupOfNames)(member={user_dn}))", description="{user_dn} replaced (escaped)")
    group_roles: dict[str, str] = Field(min_length=1, description="group DN -> role name")
    fallback_local: bool = Field(False, description="directory unreachable: accept a user's local password (if the user has one)")
    timeout_s: float = Field(5.0, gt=0, le=60)

    @field_validator("bind_dn_template")
    @classmethod
    def _template(cls, v: str) -> str:
        if "{username}" not in v:
            raise ValueError("bind_dn_template must contain {username}")
        return v

    @field_validator("group_filter")
    @classmethod
    def _filter(cls, v: str) -> str:
        if "{user_dn}" not in v or not (v.startswith("(") and v.endswith(")")):
            raise ValueError("group_filter must be an LDAP filter in parentheses containing {user_dn}")
        return v

    @model_validator(mode="after")
    def _tls(self) -> LdapConfig:
        if self.start_tls and self.url.startswith("ldaps://"):
            raise ValueError("start_tls is for ldap:// URLs; ldaps:// is TLS already")
        return self


MEANINGS = ("performed", "reviewed", "approved")
Meaning = Literal["performed", "reviewed", "approved"]
#: what a signature rule may name besides a command: the variants of a command that are critical on their own
SIGNED_VARIANTS = ("create_batch.no_challenge", *(f"rework.{op}" for op in ("remove", "add", "replace", "dissolve", "decommission", "reprint")),
                   *(f"users_admin.{a}" for a in ("add", "roles", "passwd", "lock", "unlock", "deactivate", "reactivate")))
#: the critical actions signed by default (21 CFR 11.50/11.200, Annex 11 §14): action -> meaning of the signature
DEFAULT_SIGNED: dict[str, Meaning] = {
    "start_batch": "performed",                 # the decision to produce (production follows a passed challenge by itself)
    "create_batch.no_challenge": "approved",    # waiving the challenge test of a batch
    "close_batch": "approved",                  # batch close = release of its records
    "rework.decommission": "performed",
    "rework.dissolve": "performed",
    "provision_pool": "performed",              # serial import (also `linectl serials import`)
    "recall_batch": "approved",                 # recall marking (also `linectl recall --mark`)
    "users_admin": "performed",                 # user and role changes
}
#: always signed, not configurable: the signature is the command (meaning reviewed or approved, the signer's choice)
REVIEW_COMMAND = "sign_review"


class SignatureRules(_Model):
    """Which actions need an electronic signature, and which a second person's too (four eyes)."""

    required: dict[str, Meaning] = Field(default_factory=lambda: dict(DEFAULT_SIGNED), description="action (a command name, or "
                                         "create_batch.no_challenge, rework.<operation>, users_admin.<action>) -> the meaning of "
                                         "its signature; replaces the default list")
    four_eyes: dict[str, Meaning] = Field(default_factory=dict, description="action -> the meaning of the second person's "
                                          "signature (another user who may send the command); the action must be in required")

    @field_validator("required", "four_eyes")
    @classmethod
    def _actions(cls, v: dict[str, str]) -> dict[str, str]:
        unknown = [a for a in v if a not in COMMAND_NAMES and a not in SIGNED_VARIANTS]
        if unknown:
            raise ValueError(f"unknown action {', '.join(map(repr, unknown))}; a command name or one of {', '.join(SIGNED_VARIANTS)}")
        return v

    @model_validator(mode="after")
    def _four_eyes_signed(self) -> SignatureRules:
        if REVIEW_COMMAND in self.required:
            raise ValueError(f"required.{REVIEW_COMMAND}: a review is always signed (meaning reviewed or approved, given by the signer)")
        loose = [a for a in self.four_eyes if a not in self.required and a != REVIEW_COMMAND]
        if loose:
            raise ValueError(f"four_eyes {', '.join(loose)}: not in required (the first signature comes before the second)")
        return self


class AccessConfig(_Model):
    enabled: bool = Field(True, description="false: every command anonymous (a loud warning at start)")
    roles: dict[str, list[str]] = Field(default_factory=dict, description="role -> the commands it may send; replaces a built-in "
                                        "role's list (operator, supervisor, qa, engineer, administrator, l3) or adds a role")
    password: PasswordPolicy = Field(default_factory=PasswordPolicy)
    lockout: Lockout = Field(default_factory=Lockout)
    session_ttl_s: int = Field(8 * 3600, ge=60, le=7 * 86400, description="a login's token expires this long after it was issued")
    devices: dict[str, list[str]] = Field(default_factory=dict, description="plc:<device> -> the commands its tags may send "
                                          f"(default: {', '.join(DEFAULT_DEVICE_PERMISSIONS)})")
    ldap: LdapConfig | None = None
    signatures: SignatureRules = Field(default_factory=SignatureRules, description="electronic signatures of critical actions")

    @field_validator("roles")
    @classmethod
    def _roles(cls, v: dict[str, list[str]]) -> dict[str, list[str]]:
        for role, cmds in v.items():
            if not re.fullmatch(r"[a-z][a-z0-9_]{0,31}", role):
                raise ValueError(f"role name {role!r}: lower case letters, digits, _ (up to 32)")
            v[role] = _commands(cmds, f"roles.{role}")
        return v

    @field_validator("devices")
    @classmethod
    def _devices(cls, v: dict[str, list[str]]) -> dict[str, list[str]]:
        for dev, cmds in v.items():
            if not re.fullmatch(DEVICE_PATTERN, dev):
                raise ValueError(f"devices: {dev!r} must be plc:<device name>")
            if "users_admin" in cmds:
                raise ValueError(f"devices.{dev}: a device never administers users")
            v[dev] = _commands(cmds, f"devices.{dev}")
        return v

    @model_validator(mode="after")
    def _ldap_roles(self) -> AccessConfig:
        if self.ldap is not None:
            unknown = sorted({r for r in self.ldap.group_roles.values() if r not in self.role_names})
            if unknown:
                raise ValueError(f"ldap.group_roles maps to unknown role {', '.join(unknown)}; roles: {', '.join(self.role_names)}")
        return self

    @property
    def role_names(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys((*ROLE_NAMES, *self.roles)))

    def role_permissions(self, role: str) -> frozenset[str]:
        if role in self.roles:
            return frozenset(self.roles[role])
        return frozenset(DEFAULT_ROLES.get(role, ()))

    def permissions(self, roles: tuple[str, ...] | list[str]) -> frozenset[str]:
        """The union of the roles' commands (a role the config no longer has gives nothing)."""
        out: frozenset[str] = frozenset()
        for r in roles:
            out |= self.role_permissions(r)
        return out

    def device_permissions(self, device: str) -> frozenset[str]:
        return frozenset(self.devices.get(device, DEFAULT_DEVICE_PERMISSIONS))


#: the config used when a line config has no access: section
DISABLED = {"enabled": False}
USERNAME = USERNAME_PATTERN
Channel = Literal["mqtt", "cli", "opcua", "plc", "internal"]
