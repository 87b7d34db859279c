"""People, sessions and signatures in the store: the write operations (writer thread) and their reads.

Annex 11 §9 / 21 CFR 11.10(e): a change to who may do what is a GMP-relevant change. Every change of a users row
is one audit record with the old and the new value and the reason (a password only as "changed", never its hash),
and the row carries `digest`: sha256 over its audited fields and the seq of the record that made it. The same
digest is written in that record's detail, which the hash chain protects, so a row edited outside linectl (roles
added, a deactivated user revived, a password hash swapped, an older version of the row put back) no longer
matches its record and `linectl audit verify` names it (`verify_identity`). Signatures are chained the same way.

Failed login attempts are a counter on the row (not in the digest: a flood of wrong passwords must not write an
audit record each); the lock they cause is an audited change.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection

from linectl.store.model import StoreError
from linectl.store.writer import Tx

#: audit actions that make a version of a users row (their detail has username and digest)
USER_ACTIONS = ("user_added", "user_roles_changed", "user_password_changed", "user_locked", "user_unlocked", "user_deactivated",
                "user_reactivated", "user_changed")
SIGNATURE_ACTION = "signature_added"
#: locked until unlocked by an administrator
LOCKED_FOREVER = "9999-12-31T23:59:59.999999+00:00"
MEANINGS = ("performed", "reviewed", "approved")

_DIGEST_FIELDS = ("username", "display_name", "roles", "password_hash", "password_history", "source", "active", "locked_until",
                  "lock_reason", "password_changed_at", "created_at", "changed_at")
_USER_COLS = ", ".join(_DIGEST_FIELDS) + ", failed_attempts, audit_seq, digest"
_SIG_FIELDS = ("record_ref", "record_digest", "signer", "signer_name", "meaning", "signed_at", "second_signer", "second_signer_name",
               "second_meaning", "second_signed_at")


@dataclass(frozen=True)
class UserRecord:
    username: str
    display_name: str
    roles: tuple[str, ...]
    password_hash: str | None
    password_history: tuple[str, ...]
    source: str
    active: bool
    locked_until: str | None
    lock_reason: str | None
    password_changed_at: str | None
    created_at: str
    changed_at: str
    failed_attempts: int
    audit_seq: int
    digest: str

    def locked_at(self, now_iso: str) -> bool:
        return self.locked_until is not None and self.locked_until > now_iso

    def public(self) -> dict[str, Any]:
        """The row as a list or an audit record shows it: no hash."""
        return {
            "username": self.username, "display_name": self.display_name, "roles": list(self.roles), "source": self.source,
            "active": self.active, "locked_until": self.locked_until, "lock_reason": self.lock_reason,
            "password_set": self.password_hash is not None, "password_changed_at": self.password_changed_at,
            "failed_attempts": self.failed_attempts, "created_at": self.created_at, "changed_at": self.changed_at,
        }


@dataclass(frozen=True)
class SessionRecord:
    id: int
    username: str
    channel: str
    client_id: str
    issued_at: str
    expires_at: str
    revoked_at: str | None


@dataclass(frozen=True)
class SignatureRecord:
    id: int
    record_ref: str
    record_digest: str
    signer: str
    signer_name: str
    meaning: str
    signed_at: str
    second_signer: str | None
    second_signer_name: str | None
    second_meaning: str | None
    second_signed_at: str | None
    audit_seq: int
    digest: str


@dataclass(frozen=True)
class SignatureSpec:
    """A signature to write with the audit record it signs, in the same transaction (linectl.access.signing makes it,
    after the signers' passwords were checked). `second`: (username, display name, meaning) of a second person."""

    signer: str
    signer_name: str
    meaning: str
    second: tuple[str, str, str] | None = None


def _canon(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def user_digest(fields: dict[str, Any], audit_seq: int) -> str:
    """sha256 over the audited fields of a users row (as stored: roles and history as JSON text) and its record's seq."""
    return hashlib.sha256(_canon({**{k: fields[k] for k in _DIGEST_FIELDS}, "audit_seq": audit_seq}).encode()).hexdigest()


def signature_digest(fields: dict[str, Any], audit_seq: int) -> str:
    return hashlib.sha256(_canon({**{k: fields[k] for k in _SIG_FIELDS}, "audit_seq": audit_seq}).encode()).hexdigest()


def _view(fields: dict[str, Any]) -> dict[str, Any]:
    """What an audit record says of a row version: every audited field but the hashes (a password: set or not, when)."""
    return {
        "display_name": fields["display_name"], "roles": json.loads(fields["roles"]), "source": fields["source"],
        "active": bool(fields["active"]), "locked_until": fields["locked_until"], "lock_reason": fields["lock_reason"],
        "password_set": fields["password_hash"] is not None, "password_changed_at": fields["password_changed_at"],
    }


def _load(tx: Tx, username: str) -> dict[str, Any] | None:
    r = tx.cur.execute(f"SELECT {_USER_COLS} FROM users WHERE username=?", (username,)).fetchone()
    if r is None:
        return None
    return dict(zip((*_DIGEST_FIELDS, "failed_attempts", "audit_seq", "digest"), r))


# --------------------------------------------------------------------------- writes (writer thread)


def op_user_add(tx: Tx, username: str, display_name: str, roles: list[str], password_hash: str | None, source: str,
                actor: str, origin: str, reason: str, signature: SignatureSpec | None = None) -> int:
    """A new user; returns the seq of its audit record. A username is never reused (deactivated users stay)."""
    if _load(tx, username) is not None:
        raise StoreError(f"user {username!r} exists (users are never deleted: a deactivated one keeps the name)")
    fields: dict[str, Any] = {
        "username": username, "display_name": display_name, "roles": json.dumps(sorted(set(roles))), "password_hash": password_hash,
        "password_history": "[]", "source": source, "active": 1, "locked_until": None, "lock_reason": None,
        "password_changed_at": tx.ts if password_hash is not None else None, "created_at": tx.ts, "changed_at": tx.ts,
    }
    seq = tx.next_audit_seq()
    digest = user_digest(fields, seq)
    got = tx.audit(actor, origin, "user_added", {"username": username, "old": None, "new": _view(fields), "reason": reason, "digest": digest})
    assert got == seq
    cols = (*_DIGEST_FIELDS, "failed_attempts", "audit_seq", "digest")
    tx.cur.execute(f"INSERT INTO users({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})",
                   (*(fields[k] for k in _DIGEST_FIELDS), 0, seq, digest))
    if signature is not None:
        sign_record(tx, seq, signature, origin, "user_added")
    return seq


def op_user_change(tx: Tx, username: str, changes: dict[str, Any], action: str, actor: str, origin: str, reason: str,
                   history_n: int = 0, signature: SignatureSpec | None = None) -> int:
    """Change audited fields of a user (roles as a list); one audit record with old and new value; returns its seq.

    A new password_hash pushes the old one into password_history (the newest `history_n` kept) and stamps
    password_changed_at. Refused when nothing would change: a record that changes nothing says nothing."""
    if action not in USER_ACTIONS:
        raise StoreError(f"unknown user change {action!r}")
    row = _load(tx, username)
    if row is None:
        raise StoreError(f"no user {username!r}")
    new = dict(row)
    for k, v in changes.items():
        if k not in _DIGEST_FIELDS or k in ("username", "created_at", "changed_at", "password_history", "password_changed_at"):
            raise StoreError(f"user field {k!r} cannot be changed")
        new[k] = json.dumps(sorted(set(v))) if k == "roles" else (int(bool(v)) if k == "active" else v)
    if "password_hash" in changes:
        old_hashes = json.loads(row["password_history"])
        if row["password_hash"] is not None:
            old_hashes = [row["password_hash"], *old_hashes]
        new["password_history"] = json.dumps(old_hashes[: max(0, history_n)])
        new["password_changed_at"] = tx.ts
    old_view, new_view = _view(row), _view(new)
    changed = [k for k in new_view if old_view[k] != new_view[k]]
    if not changed:
        raise StoreError(f"user {username!r}: nothing to change")
    new["changed_at"] = tx.ts
    seq = tx.next_audit_seq()
    digest = user_digest(new, seq)
    got = tx.audit(actor, origin, action, {"username": username, "old": {k: old_view[k] for k in changed},
                                           "new": {k: new_view[k] for k in changed}, "reason": reason, "digest": digest})
    assert got == seq
    sets = [k for k in _DIGEST_FIELDS if k != "username"]
    reset = ", failed_attempts=0" if "locked_until" in changes and changes["locked_until"] is None else ""
    tx.cur.execute(f"UPDATE users SET {', '.join(f'{k}=?' for k in sets)}, audit_seq=?, digest=?{reset} WHERE username=?",
                   (*(new[k] for k in sets), seq, digest, username))
    if signature is not None:
        sign_record(tx, seq, signature, origin, action)
    return seq


def op_login_result(tx: Tx, username: str, ok: bool, attempts: int, lock_until: str, origin: str) -> dict[str, Any]:
    """Count a failed login (locking the user at `attempts`, an audited change) or clear the count after a good one."""
    row = _load(tx, username)
    if row is None:
        return {"failed_attempts": 0, "locked": False}
    if ok:
        if row["failed_attempts"]:
            tx.cur.execute("UPDATE users SET failed_attempts=0 WHERE username=?", (username,))
        return {"failed_attempts": 0, "locked": False}
    n = int(row["failed_attempts"]) + 1
    tx.cur.execute("UPDATE users SET failed_attempts=? WHERE username=?", (n, username))
    if n >= attempts:
        op_user_change(tx, username, {"locked_until": lock_until, "lock_reason": f"{n} failed logins"}, "user_locked", "system", origin,
                       f"{n} failed logins in a row (access.lockout.attempts = {attempts})")
        return {"failed_attempts": n, "locked": True}
    return {"failed_attempts": n, "locked": False}


def op_session_open(tx: Tx, token_hash: str, username: str, channel: str, client_id: str, expires_at: str, origin: str) -> int:
    tx.cur.execute(
        "INSERT INTO sessions(token_hash, username, channel, client_id, issued_at, expires_at) VALUES (?,?,?,?,?,?)",
        (token_hash, username, channel, client_id, tx.ts, expires_at),
    )
    sid = int(tx.cur.lastrowid or 0)
    tx.audit(username, origin, "session_opened", {"username": username, "session": sid, "channel": channel, "client_id": client_id,
                                                  "expires_at": expires_at})
    return sid


def op_session_revoke(tx: Tx, token_hash: str, actor: str, origin: str, reason: str) -> int | None:
    """Revoke a session (logout); None when no open session has this token."""
    r = tx.cur.execute("SELECT id, username FROM sessions WHERE token_hash=? AND revoked_at IS NULL", (token_hash,)).fetchone()
    if r is None:
        return None
    tx.cur.execute("UPDATE sessions SET revoked_at=?, revoked_by=? WHERE id=?", (tx.ts, actor, r[0]))
    tx.audit(actor, origin, "session_closed", {"username": r[1], "session": r[0], "reason": reason})
    return int(r[0])


def op_signature_add(tx: Tx, record_ref: str, record_digest: str, signer: str, signer_name: str, meaning: str,
                     second: tuple[str, str, str] | None, origin: str, context: dict[str, Any] | None = None) -> tuple[int, int]:
    """A signature row and its audit record (actor: the signer); returns (signature id, audit seq).

    `context` adds keys to the record's detail (the signed record's action and lot, so a batch's review finds it)."""
    for m in (meaning, *(() if second is None else (second[2],))):
        if m not in MEANINGS:
            raise StoreError(f"signature meaning {m!r}: one of {', '.join(MEANINGS)}")
    if not record_ref.startswith(("audit:", "event:")) or len(record_ref) < 7:
        raise StoreError(f"record_ref {record_ref!r} must be audit:<seq> or event:<event id>")
    if len(record_digest) != 64 or any(c not in "0123456789abcdef" for c in record_digest):
        raise StoreError("record_digest must be a sha256 hex digest")
    if record_ref.startswith("audit:"):  # an audit record is signed as its chain hash (which covers its whole content)
        row = tx.cur.execute("SELECT hash FROM audit WHERE seq=?", (int(record_ref[6:]) if record_ref[6:].isdigit() else -1,)).fetchone()
        if row is None:
            raise StoreError(f"{record_ref}: no such audit record to sign")
        if row[0] != record_digest:
            raise StoreError(f"{record_ref}: record_digest is not that record's hash (the record changed, or another one is meant)")
    fields: dict[str, Any] = {
        "record_ref": record_ref, "record_digest": record_digest, "signer": signer, "signer_name": signer_name, "meaning": meaning,
        "signed_at": tx.ts, "second_signer": None if second is None else second[0], "second_signer_name": None if second is None else second[1],
        "second_meaning": None if second is None else second[2], "second_signed_at": None if second is None else tx.ts,
    }
    seq = tx.next_audit_seq()
    digest = signature_digest(fields, seq)
    got = tx.audit(signer, origin, SIGNATURE_ACTION, {**(context or {}), **fields, "digest": digest})
    assert got == seq
    cols = (*_SIG_FIELDS, "audit_seq", "digest")
    tx.cur.execute(f"INSERT INTO signatures({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})",
                   (*(fields[k] for k in _SIG_FIELDS), seq, digest))
    return int(tx.cur.lastrowid or 0), seq


def sign_record(tx: Tx, seq: int, spec: SignatureSpec, origin: str, action: str, lot: Any = None) -> tuple[int, int]:
    """Sign audit record `seq`, written just before in this transaction: the row links to it by `audit:<seq>` and its
    chain hash (which covers the record's whole content), so the signature cannot be moved to another record
    (21 CFR 11.70) and is committed with the record or not at all."""
    assert tx.next_audit_seq() == seq + 1, "sign the record just written"
    context: dict[str, Any] = {"signed_action": action, **({"lot": lot} if isinstance(lot, str) else {})}
    return op_signature_add(tx, f"audit:{seq}", tx.head_hash(), spec.signer, spec.signer_name, spec.meaning, spec.second, origin, context)


# --------------------------------------------------------------------------- reads


def _user(r: Any) -> UserRecord:
    d = dict(zip((*_DIGEST_FIELDS, "failed_attempts", "audit_seq", "digest"), r))
    return UserRecord(
        username=d["username"], display_name=d["display_name"], roles=tuple(json.loads(d["roles"])), password_hash=d["password_hash"],
        password_history=tuple(json.loads(d["password_history"])), source=d["source"], active=bool(d["active"]),
        locked_until=d["locked_until"], lock_reason=d["lock_reason"], password_changed_at=d["password_changed_at"],
        created_at=d["created_at"], changed_at=d["changed_at"], failed_attempts=int(d["failed_attempts"]), audit_seq=int(d["audit_seq"]),
        digest=d["digest"],
    )


def read_user(reader: Any, username: str) -> UserRecord | None:
    rows = reader.q(f"SELECT {_USER_COLS} FROM users WHERE username=?", (username,))
    return _user(rows[0]) if rows else None


def read_users(reader: Any) -> list[UserRecord]:
    return [_user(r) for r in reader.q(f"SELECT {_USER_COLS} FROM users ORDER BY username")]


def read_session(reader: Any, token_hash: str) -> SessionRecord | None:
    rows = reader.q("SELECT id, username, channel, client_id, issued_at, expires_at, revoked_at FROM sessions WHERE token_hash=?", (token_hash,))
    return SessionRecord(*rows[0]) if rows else None


def read_signatures(reader: Any, record_ref: str) -> list[SignatureRecord]:
    cols = ", ".join(("id", *_SIG_FIELDS, "audit_seq", "digest"))
    return [SignatureRecord(*r) for r in reader.q(f"SELECT {cols} FROM signatures WHERE record_ref=? ORDER BY id", (record_ref,))]


def verify_identity(c: Connection) -> tuple[int | None, str] | None:
    """The first users or signatures row that does not match the audit record that made it: (seq, reason), or None.

    Run after the chain itself verified, on the same snapshot. A row whose fields no longer give its digest was
    edited; a row whose digest is not the one its record carries (or whose record is not the user's latest change)
    was replaced, e.g. by an older version; a user the trail added but the table lacks was deleted."""
    latest: dict[str, tuple[int, str]] = {}
    marks = ",".join("?" * len(USER_ACTIONS))
    for seq, detail in c.exec_driver_sql(f"SELECT seq, detail FROM audit WHERE action IN ({marks}) ORDER BY seq", USER_ACTIONS):
        d = json.loads(detail)
        if isinstance(d, dict) and isinstance(d.get("username"), str):
            latest[d["username"]] = (int(seq), str(d.get("digest")))
    seen: set[str] = set()
    for r in c.exec_driver_sql(f"SELECT {_USER_COLS} FROM users ORDER BY username"):
        fields = dict(zip((*_DIGEST_FIELDS, "failed_attempts", "audit_seq", "digest"), r))
        name, seq, stored = fields["username"], int(fields["audit_seq"]), fields["digest"]
        seen.add(name)
        if user_digest(fields, seq) != stored:
            return seq, f"users row {name!r} was altered outside linectl: its fields do not match its digest"
        want = latest.get(name)
        if want is None:
            return seq, f"users row {name!r} has no audit record (added outside linectl)"
        if want != (seq, stored):
            return want[0], (f"users row {name!r} is not the version its last audit record {want[0]} made "
                             f"(the row claims record {seq}): replaced outside linectl")
    gone = sorted(set(latest) - seen)
    if gone:
        return latest[gone[0]][0], f"users row {gone[0]!r} was deleted outside linectl (the audit trail has it)"
    cols = ", ".join((*_SIG_FIELDS, "audit_seq", "digest", "id"))
    for r in c.exec_driver_sql(f"SELECT {cols} FROM signatures ORDER BY id"):
        fields = dict(zip((*_SIG_FIELDS, "audit_seq", "digest", "id"), r))
        seq = int(fields["audit_seq"])
        rec = c.exec_driver_sql("SELECT action, detail FROM audit WHERE seq=?", (seq,)).fetchone()
        if signature_digest(fields, seq) != fields["digest"] or rec is None or rec[0] != SIGNATURE_ACTION \
                or json.loads(rec[1]).get("digest") != fields["digest"]:
            return seq, f"signatures row {fields['id']} was altered outside linectl: it does not match its audit record {seq}"
        ref = str(fields["record_ref"])
        if ref.startswith("audit:"):
            signed = c.exec_driver_sql("SELECT hash FROM audit WHERE seq=?", (int(ref[6:]) if ref[6:].isdigit() else -1,)).fetchone()
            if signed is None or signed[0] != fields["record_digest"]:
                return seq, f"signatures row {fields['id']} signs {ref}, whose hash is not the digest it signed"
    n_sig = c.exec_driver_sql("SELECT count(*) FROM signatures").scalar() or 0
    n_rec = c.exec_driver_sql("SELECT count(*) FROM audit WHERE action=?", (SIGNATURE_ACTION,)).scalar() or 0
    if n_sig != n_rec:
        return None, f"{n_rec} signatures in the audit trail but {n_sig} rows in signatures (deleted outside linectl)"
    return None
