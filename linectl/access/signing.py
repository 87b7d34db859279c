"""Electronic signatures of critical actions (21 CFR 11.50, 11.70, 11.100, 11.200, 11.300; EU GMP Annex 11 §14).

A signature is the signer's user name and password entered again for this one action, checked at the time of
signing even when the command comes within a session (11.200(a)(1): the simplest continuous-session rule that
complies is to ask both components every time), with its meaning (performed, reviewed, approved). Which actions
need one, and which a second person's too, is `access.signatures` (settings.SignatureRules). The second person
must be another user who may send the command himself (four eyes). Refusals, before anything runs:
  signature_required  the action needs a signature (or a second one) and none came; a device cannot sign
  invalid_signature   the block is malformed, or a signature with no rule gives no meaning
  signer_mismatch     the first signer is not the user who sends the command
  wrong_meaning       the meaning given is not the one the rule fixes
  same_signer         the second signer is the first
  signature_failed    wrong user name or password (counts towards access.lockout like a failed login)
  locked, deactivated, password_expired, rate_limited, directory_unavailable  as at login, for a signer
  signer_forbidden    a signer who may not send this command, or a service account (role l3): only a person signs
An L3 service account's provision_pool that answers an outstanding serial request of the line (checked by the MQTT
bridge, which marks the command) matches no rule: the decision to import was the line's own request, and the
service account is no person who could sign (README "Electronic signatures").
The verified signers become a Signatures, which Line.execute writes with the command's audit record in one
transaction (store identity.sign_record).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError

from linectl.access.principal import Principal, permits
from linectl.access.settings import REVIEW_COMMAND, SERVICE_ROLE, Meaning, SignatureRules
from linectl.control import USERNAME_PATTERN, CommandRejected
from linectl.store.identity import SignatureSpec

if TYPE_CHECKING:
    from linectl.access.gate import Access

#: envelope keys of a command payload (MQTT) that carry signatures, taken off like `auth`
SIGNATURE_KEYS = ("signature", "second_signature")
#: the meanings a review may be signed with
REVIEW_MEANINGS = ("reviewed", "approved")


class SignatureBlock(BaseModel):
    """`signature` / `second_signature` of a command: the signer's credential entered for this action, and its meaning."""

    model_config = ConfigDict(extra="forbid")

    username: str = Field(pattern=USERNAME_PATTERN)
    password: SecretStr = Field(min_length=1, max_length=1024)
    meaning: Meaning | None = None


@dataclass(frozen=True)
class Signer:
    username: str
    display_name: str
    meaning: str


@dataclass(frozen=True)
class Signatures:
    """Verified signers of one command (made by `sign` only after their passwords were checked)."""

    first: Signer
    second: Signer | None = None

    def spec(self) -> SignatureSpec:
        s = self.second
        return SignatureSpec(self.first.username, self.first.display_name, self.first.meaning,
                             None if s is None else (s.username, s.display_name, s.meaning))

    def public(self) -> dict[str, Any]:
        """What the command's audit record and reply say of its signature."""
        out: dict[str, Any] = {"signer": self.first.username, "signer_name": self.first.display_name, "meaning": self.first.meaning}
        if self.second is not None:
            out.update(second_signer=self.second.username, second_signer_name=self.second.display_name, second_meaning=self.second.meaning)
        return out


@dataclass(frozen=True)
class Requirement:
    """The signature rule of a command: the action it matched, the meaning (None: the signer's, for a review) and
    the second person's meaning (None: one signature)."""

    action: str
    meaning: str | None
    second_meaning: str | None


#: PackML commands that start the batch in some states only: an Unhold of a line Held on an empty serial pool
#: restarts the batch that fault stopped (it runs start_batch), an Unhold of a paused line resumes it. The line says
#: which (Line.restarts_batch) and holds such an Unhold to start_batch's rule then; a channel checks a signature
#: given with one against that rule.
MAY_START_BATCH = ("Unhold",)


def signed_actions(command: Any, *, starts_batch: bool = False) -> tuple[str, ...]:
    """The rule names of a command, the most specific first (rework.decommission before rework).

    `starts_batch`: the command (a PackML Unhold, MAY_START_BATCH) starts the batch in the line's state now."""
    name = str(command.name)
    if name == "create_batch" and command.challenge is False:
        return ("create_batch.no_challenge", name)
    if name == "rework":
        return (f"rework.{command.operation}", name)
    if name == "users_admin":
        return (f"users_admin.{command.action}", name)
    if name == "packml_command" and (command.command == "Start" or (starts_batch and command.command in MAY_START_BATCH)):
        return ("start_batch",)  # PackML Start (an Unhold that restarts) starts the batch: the same decision
    if name == "provision_pool" and command.l3_answer:
        return ()  # the L3 service account's answer to the line's own request (marked by the MQTT bridge only)
    return (name,)


def requirement(rules: SignatureRules, command: Any, *, starts_batch: bool = False) -> Requirement | None:
    """The signature `command` needs under `rules`, or None. A review (sign_review) always needs one.

    `starts_batch`: see signed_actions (the line knows it; a channel cannot)."""
    if command.name == REVIEW_COMMAND:
        return Requirement(REVIEW_COMMAND, None, rules.four_eyes.get(REVIEW_COMMAND))
    for action in signed_actions(command, starts_batch=starts_batch):
        if action in rules.required:
            return Requirement(action, rules.required[action], rules.four_eyes.get(action))
    return None


def _block(access: Access, raw: Any, which: str, origin: str) -> SignatureBlock:
    if not isinstance(raw, dict):
        raise access.deny("invalid_signature", f"{which} must be an object {{username, password, meaning}}", origin)
    try:
        return SignatureBlock.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or which}: {e['msg']}" for e in exc.errors(include_input=False))
        raise access.deny("invalid_signature", f"{which}: {problems}", origin) from None


def _meaning(access: Access, given: str | None, fixed: str | None, action: str, which: str, origin: str, who: str) -> str:
    if fixed is not None:
        if given is not None and given != fixed:
            raise access.deny("wrong_meaning", f"{which} of {action} means {fixed!r} (access.signatures), not {given!r}", origin, who)
        return fixed
    if action == REVIEW_COMMAND:
        m = given or "reviewed"
        if m not in REVIEW_MEANINGS:
            raise access.deny("wrong_meaning", f"a review is signed as reviewed or approved, not {m!r}", origin, who)
        return m
    if given is None:
        raise access.deny("invalid_signature", f"{which}: give its meaning (performed, reviewed or approved): no rule of "
                          f"access.signatures names {action}", origin, who)
    return given


async def _verify(access: Access, b: SignatureBlock, command: Any, channel: str, origin: str, which: str) -> Principal:
    """The signer's password checked now (a wrong one counts towards the lockout), and the signer's permission."""
    try:
        p = await access.authenticate(b.username, b.password.get_secret_value(), channel=channel, origin=origin)
    except CommandRejected as exc:
        code = "signature_failed" if exc.code in ("wrong_password", "unauthenticated") else exc.code
        raise CommandRejected(f"{which} of {b.username}: {exc.reason}", code) from None
    why = permits(p, command)
    if why is not None:
        raise access.deny("signer_forbidden", f"{which}: {why}; a signer must be allowed the action", origin, b.username)
    if SERVICE_ROLE in p.roles:
        raise access.deny("signer_forbidden", f"{which}: {b.username} is a service account (role {SERVICE_ROLE}): only a person signs",
                          origin, b.username)
    return p


async def sign(access: Access, command: Any, principal: Principal | None, first: Any, second: Any, *, channel: str,
               origin: str) -> Signatures | None:
    """The verified signatures of `command` from its envelope blocks (None: none given and none needed).

    Cheap refusals (missing, malformed, wrong signer or meaning, same person) come before any password is tried."""
    who = "" if principal is None else principal.name
    if principal is not None:  # a command its sender may not give is refused as such, signed or not
        why = permits(principal, command)
        if why is not None:
            raise access.deny("forbidden", why, origin, who)
    # a signature given with a command that may start the batch (a PackML Unhold) is one of start_batch's; given none,
    # the channel lets it pass and the line refuses it if it does start the batch now (Line._check_signed)
    req = (requirement(access.cfg.signatures, command, starts_batch=first is not None)
           if access.enabled or command.name == REVIEW_COMMAND else None)
    if first is None:
        if second is not None:
            raise access.deny("invalid_signature", "second_signature without signature", origin, who)
        if req is None:
            return None
        how = f"meaning {req.meaning}" if req.meaning else "meaning reviewed or approved"
        raise access.deny("signature_required", f"{command.name} needs an electronic signature ({how}; access.signatures "
                          f"{req.action}): re-enter user name and password in signature", origin, who)
    b1 = _block(access, first, "signature", origin)
    if principal is not None and principal.kind == "user" and b1.username != principal.name:
        raise access.deny("signer_mismatch", f"signature by {b1.username!r}, but the command comes from {principal.name!r}: "
                          "the first signer is who sends it", origin, who)
    action = req.action if req is not None else str(command.name)
    m1 = _meaning(access, b1.meaning, req.meaning if req is not None else None, action, "signature", origin, b1.username)
    if req is not None and req.second_meaning is not None and second is None:
        raise access.deny("signature_required", f"{action} needs a second person's signature too (four eyes, meaning "
                          f"{req.second_meaning}): second_signature", origin, who)
    b2 = None if second is None else _block(access, second, "second_signature", origin)
    m2 = None
    if b2 is not None:
        if b2.username == b1.username:
            raise access.deny("same_signer", f"the second signature is {b1.username}'s again: four eyes need another person", origin, who)
        m2 = _meaning(access, b2.meaning, req.second_meaning if req is not None else None, action, "second_signature", origin, b2.username)
    p1 = await _verify(access, b1, command, channel, origin, "signature")
    s2 = None
    if b2 is not None:
        assert m2 is not None
        p2 = await _verify(access, b2, command, channel, origin, "second_signature")
        s2 = Signer(p2.name, p2.display_name, m2)
    return Signatures(Signer(p1.name, p1.display_name, m1), s2)


async def offline_signature(access: Access, command: Any, user: str | None, password: str | None, blocks: dict[str, Any], *,
                            origin: str) -> Signatures | None:
    """For a CLI command that writes the store itself (recall --mark, serials import): the user proven, allowed the
    command, and its signature verified, as the daemon does for the same command over MQTT. CommandRejected names
    what is wrong; None: access control is off (or no rule and no signature)."""
    if not access.enabled:
        if blocks:
            raise CommandRejected("access control is off on this line: there are no users to sign", "unsupported")
        return None
    if not user or password is None:
        raise access.deny("unauthenticated", "this line has access control (access: in the config): give --user NAME", origin)
    principal = await access.authenticate(user, password, channel="cli", origin=origin)
    return await sign(access, command, principal, blocks.get("signature"), blocks.get("second_signature"), channel="cli", origin=origin)
