"""The access gate: logins, session tokens, directory login, user administration. Channels ask it who sent a
command; the line asks `permissions.permits` whether that one may.

Sessions (MQTT and the CLI over MQTT): `login` with user name and password returns a random token (only its
sha256 is stored) bound to the client id the bridge sees for the login (the MQTT 5 user property `origin` or
`client_id`) and valid for access.session_ttl_s; `logout` revokes it. A command then carries `auth: {token}`. A
token presented by another client id, after its expiry or after logout is refused. Instead of a token a command
may carry `auth: {username, password}`: a one-shot credential, checked for that command alone (no session), which
is how a user whose password expired changes it, and how a later e-signature re-enters the password.

Refusals (codes): unauthenticated (no or unknown credential), wrong_password, token_expired, token_revoked,
token_client_mismatch, locked, deactivated, password_expired, directory_unavailable, forbidden, rate_limited.
Every refusal is counted in `refusals` (control.RefusalTally: one log line per reason and interval, one aggregated
audit record), so a flood of guesses costs a counter each; a lock the guesses cause is an audit record of its own.
Password checks (argon2, ~25 ms each, in a worker thread) are rate limited over all callers (VERIFY_RATE).
"""

from __future__ import annotations

import asyncio
import hashlib
import secrets
import time
from collections.abc import Callable, Coroutine
from datetime import UTC, datetime, timedelta
from typing import Any

import structlog

from linectl.access.directory import DirectoryRefused, DirectoryUnavailable, DirectoryUser, directory_login
from linectl.access.passwords import PasswordRefused, check_policy, hash_password, verify_password
from linectl.access.principal import Principal, device_principal
from linectl.access.settings import SERVICE_ROLE, AccessConfig
from linectl.control import CommandRejected, RefusalTally, UsersAdmin
from linectl.store.identity import LOCKED_FOREVER, SignatureSpec, UserRecord
from linectl.store.model import StoreError

log = structlog.get_logger("linectl.access")

#: password verifications per second over all callers (burst twice that); above it a login is refused unchecked
VERIFY_RATE = 10.0
DEFAULT_USERS = (("operator", "Default operator", ("operator",)), ("qa", "Default QA", ("qa",)), ("admin", "Default administrator", ("administrator",)))


class AccessDenied(CommandRejected):
    """A command or login refused for who sent it (codes in the module docstring). Nothing changed."""


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def _iso(t: datetime) -> str:
    return t.astimezone(UTC).isoformat(timespec="microseconds")


class Access:
    def __init__(self, cfg: AccessConfig, store: Any, *, refusals: RefusalTally | None = None,
                 clock: Callable[[], datetime] = lambda: datetime.now(UTC), verify_rate: float = VERIFY_RATE) -> None:
        self.cfg = cfg
        self.store = store
        self.refusals = refusals if refusals is not None else RefusalTally("access_refused", store=store)
        self.clock = clock
        self._rate = verify_rate
        self._tokens = 2 * verify_rate
        self._last = time.monotonic()
        self._background: set[asyncio.Task[Any]] = set()

    @property
    def enabled(self) -> bool:
        return self.cfg.enabled

    # ------------------------------------------------------------------ refusals

    def deny(self, code: str, reason: str, origin: str, who: str = "") -> AccessDenied:
        """Count the refusal (first of its reason per interval logged) and return the exception to raise."""
        if self.refusals.note(code, origin, f"{who[:64]}: {reason[:120]}"):
            log.warning("access_refused", code=code, origin=origin, user=who[:64], reason=reason[:300])
        return AccessDenied(reason, code)

    def _take(self) -> bool:
        now = time.monotonic()
        self._tokens = min(2 * self._rate, self._tokens + (now - self._last) * self._rate)
        self._last = now
        if self._tokens < 1.0:
            return False
        self._tokens -= 1.0
        return True

    # ------------------------------------------------------------------ principals

    def _now(self) -> str:
        return _iso(self.clock())

    def principal(self, user: UserRecord, channel: str, origin: str, session: int | None = None) -> Principal:
        """The principal of a store user, refused when the user is deactivated or locked now."""
        if not user.active:
            raise self.deny("deactivated", f"user {user.username} is deactivated", origin, user.username)
        if user.locked_at(self._now()):
            until = "until an administrator unlocks" if user.locked_until == LOCKED_FOREVER else f"until {user.locked_until}"
            raise self.deny("locked", f"user {user.username} is locked {until} ({user.lock_reason or 'locked'})", origin, user.username)
        return Principal(name=user.username, kind="user", roles=user.roles, permissions=self.cfg.permissions(user.roles),
                         display_name=user.display_name, channel=channel, session=session)

    async def user_principal(self, username: str, channel: str, origin: str) -> Principal:
        """A user the channel authenticated itself (the OPC UA session user): must exist in the store, active, unlocked."""
        user = await asyncio.to_thread(self.store.user, username)
        if user is None:
            raise self.deny("unauthenticated", f"{username!r} is not a user of this line (linectl users add)", origin, username)
        return self.principal(user, channel, origin)

    def device(self, name: str) -> Principal:
        """A device actor (plc:<name>) with its access.devices permissions."""
        return device_principal(self.cfg, name)

    # ------------------------------------------------------------------ passwords

    async def authenticate(self, username: Any, password: Any, *, channel: str, origin: str, allow_expired: bool = False) -> Principal:
        """Check a user name and password (directory first for directory users when access.ldap is set)."""
        if not isinstance(username, str) or not isinstance(password, str) or not username or not password:
            raise self.deny("unauthenticated", "give username and password", origin)
        if not self._take():
            raise self.deny("rate_limited", "too many password checks; try again in a moment", origin, username)
        user = await asyncio.to_thread(self.store.user, username)
        ldap = self.cfg.ldap
        if ldap is not None and (user is None or user.source == "ldap"):
            if user is not None:
                self.principal(user, channel, origin)  # deactivated / locked here wins over the directory
            try:
                found = await asyncio.wait_for(asyncio.to_thread(directory_login, ldap, username, password), ldap.timeout_s * 3)
            except DirectoryRefused as exc:
                if exc.code == "wrong_password" and user is not None:
                    await self._failed(user, origin)
                raise self.deny(exc.code, exc.reason, origin, username) from None
            except (DirectoryUnavailable, TimeoutError) as exc:
                if not (ldap.fallback_local and user is not None and user.password_hash is not None):
                    raise self.deny("directory_unavailable", f"the directory cannot be asked ({exc}); no local fallback", origin, username) from None
                log.warning("directory_unavailable_local_fallback", user=username, error=str(exc)[:300])
            else:
                user = await self._sync_directory_user(user, username, found, origin)
                await self.store.login_result(username, True, attempts=self.cfg.lockout.attempts, lock_until="", origin=origin)
                return self.principal(user, channel, origin)
        assert user is None or user.username == username
        if user is None:
            await asyncio.to_thread(verify_password, None, password)  # the same cost as a wrong password
            raise self.deny("wrong_password", "wrong user name or password", origin, username)
        self.principal(user, channel, origin)  # locked or deactivated: refused before the password is tried
        if not await asyncio.to_thread(verify_password, user.password_hash, password):
            locked = await self._failed(user, origin)
            raise self.deny("wrong_password", "wrong user name or password" + ("; the user is now locked" if locked else ""), origin, username)
        await self.store.login_result(username, True, attempts=self.cfg.lockout.attempts, lock_until="", origin=origin)
        if not allow_expired and self.password_expired(user):
            raise self.deny("password_expired", f"the password of {username} is older than access.password.max_age_days = "
                            f"{self.cfg.password.max_age_days}: change it (linectl users passwd {username})", origin, username)
        return self.principal(user, channel, origin)

    def authenticate_now(self, username: Any, password: Any, *, channel: str, origin: str) -> Principal:
        """`authenticate` for a caller that cannot await: asyncua asks its user manager for the session user
        synchronously, inside the event loop. The same rules (rate limit, deactivated, locked, expired password,
        failed attempts counted towards access.lockout), with the argon2 check (~25 ms) on the loop as the rate limit
        bounds it. The counting is a store write: it is queued here and lands a moment after the refusal. A directory
        user (access.ldap) is refused: an LDAP bind could hold the line's event loop for seconds."""
        if not isinstance(username, str) or not isinstance(password, str) or not username or not password:
            raise self.deny("unauthenticated", "give username and password", origin)
        if not self._take():
            raise self.deny("rate_limited", "too many password checks; try again in a moment", origin, username)
        user = self.store.user(username)
        if user is not None and user.source == "ldap":
            raise self.deny("forbidden", f"{username} is a directory user: this channel logs in local users only", origin, username)
        if user is None:
            verify_password(None, password)  # the same cost as a wrong password
            raise self.deny("wrong_password", "wrong user name or password", origin, username)
        self.principal(user, channel, origin)  # locked or deactivated: refused before the password is tried
        if not verify_password(user.password_hash, password):
            self._later(self._failed(user, origin))
            raise self.deny("wrong_password", "wrong user name or password", origin, username)
        self._later(self.store.login_result(username, True, attempts=self.cfg.lockout.attempts, lock_until="", origin=origin))
        if self.password_expired(user):
            raise self.deny("password_expired", f"the password of {username} is older than access.password.max_age_days = "
                            f"{self.cfg.password.max_age_days}: change it (linectl users passwd {username})", origin, username)
        return self.principal(user, channel, origin)

    def _later(self, work: Coroutine[Any, Any, Any]) -> None:
        """Run a store write after the caller returns; kept referenced until done, its failure logged."""
        task = asyncio.get_running_loop().create_task(work)
        self._background.add(task)

        def done(t: asyncio.Task[Any]) -> None:
            self._background.discard(t)
            if not t.cancelled() and t.exception() is not None:
                log.warning("login_result_not_recorded", error=str(t.exception())[:300])

        task.add_done_callback(done)

    def password_expired(self, user: UserRecord) -> bool:
        days = self.cfg.password.max_age_days
        if not days or user.source != "local" or user.password_changed_at is None:
            return False
        return datetime.fromisoformat(user.password_changed_at) + timedelta(days=days) < self.clock()

    async def _failed(self, user: UserRecord, origin: str) -> bool:
        lo = self.cfg.lockout
        until = LOCKED_FOREVER if lo.lock_minutes == 0 else _iso(self.clock() + timedelta(minutes=lo.lock_minutes))
        res = await self.store.login_result(user.username, False, attempts=lo.attempts, lock_until=until, origin=origin)
        if res["locked"]:
            log.warning("user_locked", user=user.username, failed_attempts=res["failed_attempts"], until=until, origin=origin)
        return bool(res["locked"])

    async def _sync_directory_user(self, user: UserRecord | None, username: str, found: DirectoryUser, origin: str) -> UserRecord:
        """The directory's roles become the user's (audited, actor "ldap"); a first login adds the user."""
        if user is None:
            await self.store.add_user(username, found.display_name, found.roles, None, "ldap", actor="ldap", origin=origin,
                                      reason=f"first directory login ({found.dn})")
        elif tuple(sorted(user.roles)) != found.roles:
            await self.store.change_user(username, {"roles": list(found.roles)}, "user_roles_changed", actor="ldap", origin=origin,
                                         reason="directory group membership")
        got = await asyncio.to_thread(self.store.user, username)
        assert got is not None
        return got  # type: ignore[no-any-return]

    # ------------------------------------------------------------------ sessions

    async def login(self, username: Any, password: Any, *, channel: str, client_id: str, origin: str) -> dict[str, Any]:
        """A session token for `client_id`; the reply body of the MQTT `login` command."""
        principal = await self.authenticate(username, password, channel=channel, origin=origin)
        token = secrets.token_urlsafe(32)
        expires = _iso(self.clock() + timedelta(seconds=self.cfg.session_ttl_s))
        sid = await self.store.open_session(token_hash(token), principal.name, channel, client_id, expires, origin=origin)
        log.info("session_opened", user=principal.name, session=sid, client_id=client_id, expires_at=expires)
        return {"token": token, "username": principal.name, "display_name": principal.display_name, "roles": list(principal.roles),
                "expires_at": expires, "session": sid}

    async def verify_token(self, token: Any, *, client_id: str, origin: str) -> Principal:
        if not isinstance(token, str) or not token or len(token) > 256:
            raise self.deny("unauthenticated", "auth.token must be the token a login returned", origin)
        sess = await asyncio.to_thread(self.store.session, token_hash(token))
        if sess is None:
            raise self.deny("unauthenticated", "unknown token: log in first", origin)
        if sess.revoked_at is not None:
            raise self.deny("token_revoked", f"the session of {sess.username} was closed at {sess.revoked_at}: log in again", origin, sess.username)
        if sess.expires_at <= self._now():
            raise self.deny("token_expired", f"the session of {sess.username} expired at {sess.expires_at}: log in again", origin, sess.username)
        if sess.client_id != client_id:
            raise self.deny("token_client_mismatch", f"the token was issued to client {sess.client_id!r}, not {client_id!r}", origin, sess.username)
        user = await asyncio.to_thread(self.store.user, sess.username)
        if user is None:
            raise self.deny("unauthenticated", f"user {sess.username} of the session does not exist", origin, sess.username)
        return self.principal(user, sess.channel, origin, session=sess.id)

    async def logout(self, token: Any, *, client_id: str, origin: str) -> dict[str, Any]:
        principal = await self.verify_token(token, client_id=client_id, origin=origin)
        sid = await self.store.revoke_session(token_hash(token), actor=principal.name, origin=origin, reason="logout")
        return {"username": principal.name, "session": sid, "closed": True}

    async def credential(self, auth: Any, *, channel: str, client_id: str, origin: str, command: Any = None) -> Principal:
        """The principal of a command's `auth` block: {token} or a one-shot {username, password}."""
        if not isinstance(auth, dict):
            raise self.deny("unauthenticated", "the command needs auth: {token} (from login) or {username, password}", origin)
        extra = set(auth) - {"token", "username", "password"}
        if extra:
            raise self.deny("unauthenticated", f"auth: unknown key {', '.join(sorted(extra))}", origin)
        if "token" in auth:
            if "password" in auth or "username" in auth:
                raise self.deny("unauthenticated", "auth: give a token or username + password, not both", origin)
            return await self.verify_token(auth["token"], client_id=client_id, origin=origin)
        own_passwd = isinstance(command, UsersAdmin) and command.action == "passwd" and command.username == auth.get("username")
        return await self.authenticate(auth.get("username"), auth.get("password"), channel=channel, origin=origin, allow_expired=own_passwd)

    # ------------------------------------------------------------------ user administration (users_admin)

    async def admin(self, c: UsersAdmin, actor: str, origin: str, signature: SignatureSpec | None = None) -> dict[str, Any]:
        """Carry out a users_admin command for `actor` (already authorised); CommandRejected names what is wrong.

        `signature`: its e-signature, written with the change's own audit record (the offline CLI; through the daemon
        the signature goes with the users_admin command's record, Line.execute)."""
        try:
            seq = await self._admin(c, actor, origin, signature)
        except StoreError as exc:
            raise CommandRejected(str(exc), "refused") from None
        except PasswordRefused as exc:
            raise CommandRejected(str(exc), "password_policy") from None
        user = await asyncio.to_thread(self.store.user, c.username)
        log.info("user_changed", action=c.action, user=c.username, by=actor, audit_seq=seq)
        return {"action": c.action, "username": c.username, "audit_seq": seq, "user": None if user is None else user.public()}

    def _roles(self, roles: list[str]) -> list[str]:
        unknown = [r for r in roles if r not in self.cfg.role_names]
        if unknown:
            raise CommandRejected(f"unknown role {', '.join(unknown)}; roles: {', '.join(self.cfg.role_names)}", "invalid_role")
        if SERVICE_ROLE in roles and len(set(roles)) > 1:
            raise CommandRejected(f"role {SERVICE_ROLE} is an L3 service account's and goes alone: a person's account never "
                                  "answers serial requests unsigned", "invalid_role")
        return sorted(set(roles))

    async def _last_admin(self, username: str, losing: bool) -> None:
        if not losing:
            return
        users = await asyncio.to_thread(self.store.users)
        admins = [u.username for u in users if u.active and "users_admin" in self.cfg.permissions(u.roles)]
        if admins == [username]:
            raise CommandRejected(f"{username} is the last active user who may administer users; give another user that role first",
                                  "last_administrator")

    async def _admin(self, c: UsersAdmin, actor: str, origin: str, signature: SignatureSpec | None) -> int:
        pw = None if c.new_password is None else c.new_password.get_secret_value()
        if c.action == "add":
            roles = self._roles(c.roles or [])
            h = None
            if pw is not None:
                check_policy(pw, self.cfg.password, c.username)
                h = await asyncio.to_thread(hash_password, pw)
            assert c.display_name is not None
            return int(await self.store.add_user(c.username, c.display_name, roles, h, c.source, actor=actor, origin=origin, reason=c.reason,
                                                 signature=signature))
        user = await asyncio.to_thread(self.store.user, c.username)
        if user is None:
            raise CommandRejected(f"no user {c.username!r}", "unknown_user")
        changes: dict[str, Any]
        if c.action == "roles":
            roles = self._roles(c.roles or [])
            await self._last_admin(c.username, "users_admin" not in self.cfg.permissions(roles))
            changes, action = {"roles": roles}, "user_roles_changed"
        elif c.action == "passwd":
            assert pw is not None
            check_policy(pw, self.cfg.password, c.username, (*((user.password_hash,) if user.password_hash else ()), *user.password_history))
            changes, action = {"password_hash": await asyncio.to_thread(hash_password, pw)}, "user_password_changed"
        elif c.action == "lock":
            await self._last_admin(c.username, True)
            changes, action = {"locked_until": LOCKED_FOREVER, "lock_reason": c.reason[:200]}, "user_locked"
        elif c.action == "unlock":
            if user.locked_until is None:
                raise CommandRejected(f"user {c.username} is not locked", "refused")
            changes, action = {"locked_until": None, "lock_reason": None}, "user_unlocked"
        elif c.action == "deactivate":
            await self._last_admin(c.username, True)
            changes, action = {"active": False}, "user_deactivated"
        else:
            changes, action = {"active": True}, "user_reactivated"
        return int(await self.store.change_user(c.username, changes, action, actor=actor, origin=origin, reason=c.reason,
                                                history_n=self.cfg.password.history, signature=signature))


def generate_password(length: int = 16) -> str:
    """A random password every policy of access.password takes (all four character classes)."""
    alphabet = "abcdefghijkmnopqrstuvwxyzABCDEFGHJKLMNPQRSTUVWXYZ23456789"
    body = "".join(secrets.choice(alphabet) for _ in range(max(8, length) - 4))
    return body + secrets.choice("abcdefghijkmnopqrstuvwxyz") + secrets.choice("ABCDEFGHJKLMNPQRSTUVWXYZ") + secrets.choice("23456789") \
        + secrets.choice("-_.+!")
