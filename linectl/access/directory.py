"""Directory login (LDAP, via ldap3): a simple bind as the user proves the password; the groups the user is a
member of give the roles (access.ldap.group_roles). Synchronous: the gate runs it in a worker thread, bounded by
access.ldap.timeout_s.

Refused outright: an empty password (to LDAP that is an unauthenticated bind, which "succeeds"), a user in no
mapped group. A directory that cannot be reached (or answers with anything but a bind result) is
DirectoryUnavailable: the gate then refuses, or falls back to the user's local password if access.ldap says so.
"""

from __future__ import annotations

import math
import ssl
from dataclasses import dataclass

from ldap3 import BASE, NONE, SIMPLE, SUBTREE, Connection, Server, Tls
from ldap3.core.exceptions import LDAPException
from ldap3.utils.conv import escape_filter_chars
from ldap3.utils.dn import escape_rdn

from linectl.access.settings import LdapConfig

INVALID_CREDENTIALS = 49


class DirectoryUnavailable(Exception):
    """The directory could not be asked (down, TLS failure, timeout)."""


class DirectoryRefused(Exception):
    """The directory said no: wrong password or unknown user (it does not tell which), or no role."""

    def __init__(self, reason: str, code: str = "wrong_password") -> None:
        super().__init__(reason)
        self.reason = reason
        self.code = code


@dataclass(frozen=True)
class DirectoryUser:
    dn: str
    display_name: str
    roles: tuple[str, ...]


def _norm(dn: str) -> str:
    return ",".join(p.strip().lower() for p in dn.split(","))


def directory_login(cfg: LdapConfig, username: str, password: str) -> DirectoryUser:
    if not password:
        raise DirectoryRefused("empty password")
    dn = cfg.bind_dn_template.replace("{username}", escape_rdn(username))
    tls = None
    if cfg.url.startswith("ldaps://") or cfg.start_tls:
        tls = Tls(validate=ssl.CERT_REQUIRED, ca_certs_file=cfg.ca_file)
    timeout = max(1, math.ceil(cfg.timeout_s))  # ldap3 packs the receive timeout as an integer (struct)
    server = Server(cfg.url, use_ssl=cfg.url.startswith("ldaps://"), tls=tls, connect_timeout=timeout, get_info=NONE)
    conn = Connection(server, user=dn, password=password, authentication=SIMPLE, receive_timeout=timeout, raise_exceptions=False,
                      read_only=True)
    try:
        try:
            conn.open()
            if cfg.start_tls and not conn.start_tls():
                raise DirectoryUnavailable(f"StartTLS refused by {cfg.url}: {conn.result}")
            if not conn.bind():
                if conn.result and conn.result.get("result") == INVALID_CREDENTIALS:
                    raise DirectoryRefused("wrong user name or password (directory)")
                raise DirectoryUnavailable(f"bind at {cfg.url} failed: {(conn.result or {}).get('description') or conn.last_error}")
            found = conn.search(dn, "(objectClass=*)", search_scope=BASE, attributes=["displayName", "cn"])
            display = username
            if found and conn.entries:
                e = conn.entries[0]
                for attr in ("displayName", "cn"):
                    if attr in e and e[attr].value:
                        display = str(e[attr].value if not isinstance(e[attr].value, list) else e[attr].value[0])
                        break
            flt = cfg.group_filter.replace("{user_dn}", escape_filter_chars(dn))
            if not conn.search(cfg.group_search_base, flt, search_scope=SUBTREE, attributes=[]) and conn.result.get("result") not in (0, 32):
                raise DirectoryUnavailable(f"group search at {cfg.url} failed: {conn.result.get('description')}")
            groups = {_norm(str(r["dn"])) for r in (conn.response or []) if r.get("type") == "searchResEntry"}
        except LDAPException as exc:
            raise DirectoryUnavailable(f"{cfg.url}: {type(exc).__name__}: {exc}") from None
        except (DirectoryRefused, DirectoryUnavailable):
            raise
        except Exception as exc:  # noqa: BLE001 - ldap3 lets struct/socket/ssl errors through: the directory could not be asked
            raise DirectoryUnavailable(f"{cfg.url}: {type(exc).__name__}: {exc}") from None
    finally:
        try:
            conn.unbind()
        except Exception:  # noqa: BLE001, S110 - closing a connection that failed
            pass
    mapping = {_norm(g): role for g, role in cfg.group_roles.items()}
    roles = tuple(sorted({mapping[g] for g in groups if g in mapping}))
    if not roles:
        raise DirectoryRefused(f"{username} is in no group that access.ldap.group_roles maps to a role", "forbidden")
    return DirectoryUser(dn=dn, display_name=display, roles=roles)
