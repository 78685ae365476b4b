"""Auth penalty: failed logins counted per account and per address, a growing delay before
each failure's answer and a temporary lockout (``IAuthPenalty``), and the password check every
role goes through (``AuthGuard``)."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Any

from twisted.cred.error import LoginFailed, UnauthorizedLogin
from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from mailgw.interfaces import IAuthPenalty, IDirectory
from mailgw.runtime.metrics import AUTH_FAILURES

log = Logger()

SWEEP_EVERY = 1024
"""Failures recorded between two sweeps of the counters that the window has forgotten."""


@dataclass(frozen=True)
class PenaltyPolicy:
    """The penalty schedule (``[directory] auth_*``).

    The n-th failure counted in ``window`` (the larger count of the account and the address)
    waits ``base_delay * 2**(n-1)`` seconds, at most ``max_delay``, before it is answered;
    ``account_failures`` failures of one account, or ``address_failures`` from one address,
    within ``window`` lock that account / address out for ``lockout`` seconds. 0 failures:
    no lockout of that kind.
    """

    base_delay: float = 2.0
    max_delay: float = 15.0
    window: float = 600.0
    account_failures: int = 10
    address_failures: int = 30
    lockout: float = 900.0

    def delay(self, failures: int) -> float:
        if failures <= 0 or self.base_delay <= 0:
            return 0.0
        exponent = min(failures - 1, 30)
        return min(max(self.max_delay, self.base_delay), self.base_delay * 2**exponent)

    @classmethod
    def from_config(cls, config: Any) -> PenaltyPolicy:
        """From a ``DirectoryConfig``."""
        return cls(
            base_delay=config.auth_failure_delay,
            max_delay=config.auth_max_delay,
            window=config.auth_lockout_window,
            account_failures=config.auth_lockout_failures,
            address_failures=config.auth_lockout_address_failures,
            lockout=config.auth_lockout_time,
        )


@implementer(IAuthPenalty)
class MemoryAuthPenalty:
    """``IAuthPenalty`` in this process's memory (the embedded gateway state): one per node,
    in the main process, shared by its roles and its IMAP workers."""

    def __init__(self, clock: IReactorTime, policy: PenaltyPolicy | None = None) -> None:
        self.clock = clock
        self.policy = policy if policy is not None else PenaltyPolicy()
        keep = max(self.policy.account_failures, self.policy.address_failures, 32)
        self._keep = keep
        self._failures: dict[tuple[str, str], deque[float]] = {}
        self._locked: dict[tuple[str, str], float] = {}
        self._since_sweep = 0

    # -- IAuthPenalty ------------------------------------------------------------------------

    def set_policy(self, policy: PenaltyPolicy) -> None:
        """A reloaded ``[directory] auth_*`` schedule: applies to the next failure; the
        failures already counted stay counted."""
        self.policy = policy
        self._keep = max(policy.account_failures, policy.address_failures, 32)

    def locked(self, user: str, ip: str) -> defer.Deferred[bool]:
        return defer.succeed(self.is_locked(user, ip))

    def failed(self, user: str, ip: str) -> defer.Deferred[float]:
        return defer.succeed(self.record_failure(user, ip))

    def succeeded(self, user: str, ip: str) -> defer.Deferred[None]:
        self.record_success(user, ip)
        return defer.succeed(None)

    # -- the same, synchronous ------------------------------------------------------------------

    def is_locked(self, user: str, ip: str) -> bool:
        now = self.clock.seconds()
        return any(self._lock_active(k, now) for k in self._keys(user, ip))

    def record_failure(self, user: str, ip: str) -> float:
        """Count a failure; returns the delay before answering it."""
        now = self.clock.seconds()
        counts = []
        for k in self._keys(user, ip):
            stamps = self._failures.get(k)
            if stamps is None:
                stamps = self._failures[k] = deque(maxlen=self._keep)
            self._forget_old(stamps, now)
            stamps.append(now)
            counts.append(len(stamps))
            threshold = self._threshold(k)
            if threshold and len(stamps) >= threshold and not self._lock_active(k, now):
                self._locked[k] = now + self.policy.lockout
                log.warn(
                    "auth lockout: {kind} {name} locked for {lockout}s after {n} failed logins "
                    "in {window}s (last: user {user!r} from {ip})",
                    kind="account" if k[0] == "user" else "address",
                    name=k[1],
                    lockout=self.policy.lockout,
                    n=len(stamps),
                    window=self.policy.window,
                    user=user,
                    ip=ip or "-",
                )
        self._since_sweep += 1
        if self._since_sweep >= SWEEP_EVERY:
            self.sweep()
        return self.policy.delay(max(counts, default=1))

    def record_success(self, user: str, ip: str) -> None:
        if user:
            self._failures.pop(("user", user), None)

    def failures(self, user: str = "", ip: str = "") -> int:
        """Failures counted in the window for the account (or the address when no user)."""
        k = ("user", user) if user else ("ip", ip)
        stamps = self._failures.get(k)
        if stamps is None:
            return 0
        self._forget_old(stamps, self.clock.seconds())
        return len(stamps)

    def sweep(self) -> None:
        """Drop the counters and lockouts that time has emptied (bounds the memory used)."""
        self._since_sweep = 0
        now = self.clock.seconds()
        for k in [k for k, stamps in self._failures.items() if not self._forget_old(stamps, now)]:
            del self._failures[k]
        for k in [k for k, until in self._locked.items() if until <= now]:
            del self._locked[k]

    def __len__(self) -> int:
        return len(self._failures) + len(self._locked)

    # -- helpers -------------------------------------------------------------------------------

    @staticmethod
    def _keys(user: str, ip: str) -> list[tuple[str, str]]:
        keys = []
        if user:
            keys.append(("user", user))
        if ip:
            keys.append(("ip", ip))
        return keys

    def _threshold(self, k: tuple[str, str]) -> int:
        return self.policy.account_failures if k[0] == "user" else self.policy.address_failures

    def _lock_active(self, k: tuple[str, str], now: float) -> bool:
        until = self._locked.get(k)
        if until is None:
            return False
        if until <= now:
            del self._locked[k]
            return False
        return True

    def _forget_old(self, stamps: deque[float], now: float) -> int:
        horizon = now - self.policy.window
        while stamps and stamps[0] <= horizon:
            stamps.popleft()
        return len(stamps)


@implementer(IAuthPenalty)
class StateAuthPenalty:
    """``IAuthPenalty`` on the gateway state (``IGatewayState``), the same schedule as
    ``MemoryAuthPenalty``: with the Redis state, failures on every gateway count together and
    a lockout holds on all of them. Keys: ``auth:fail:user:NAME`` / ``auth:fail:ip:ADDR``
    (``hit`` windows of ``window`` seconds), ``auth:lock:user:NAME`` / ``auth:lock:ip:ADDR``
    (set for ``lockout`` seconds)."""

    def __init__(self, state: Any, policy: PenaltyPolicy | None = None) -> None:
        self.state = state
        self.policy = policy if policy is not None else PenaltyPolicy()

    def set_policy(self, policy: PenaltyPolicy) -> None:
        """A reloaded schedule: applies to the next failure."""
        self.policy = policy

    def locked(self, user: str, ip: str) -> defer.Deferred[bool]:
        keys = MemoryAuthPenalty._keys(user, ip)
        ds = [self.state.get(f"auth:lock:{kind}:{name}") for kind, name in keys]
        d: defer.Deferred[Any] = defer.gatherResults(ds, consumeErrors=True)
        return d.addCallback(lambda values: any(v is not None for v in values)).addErrback(
            lambda f: f.value.subFailure if isinstance(f.value, defer.FirstError) else f
        )

    def failed(self, user: str, ip: str) -> defer.Deferred[float]:
        policy = self.policy
        keys = MemoryAuthPenalty._keys(user, ip)

        @defer.inlineCallbacks
        def count() -> Any:
            counts = []
            for kind, name in keys:
                n = int((yield self.state.hit(f"auth:fail:{kind}:{name}", policy.window)))
                counts.append(n)
                threshold = policy.account_failures if kind == "user" else policy.address_failures
                if threshold and n >= threshold:
                    lock = f"auth:lock:{kind}:{name}"
                    if (yield self.state.get(lock)) is None:
                        yield self.state.set(lock, b"1", policy.lockout)
                        log.warn(
                            "auth lockout: {kind} {name} locked for {lockout}s after {n} failed "
                            "logins in {window}s (last: user {user!r} from {ip})",
                            kind="account" if kind == "user" else "address",
                            name=name,
                            lockout=policy.lockout,
                            n=n,
                            window=policy.window,
                            user=user,
                            ip=ip or "-",
                        )
            return policy.delay(max(counts, default=1))

        d: defer.Deferred[float] = count()
        return d

    def succeeded(self, user: str, ip: str) -> defer.Deferred[None]:
        if not user:
            return defer.succeed(None)
        d: defer.Deferred[None] = self.state.delete(f"auth:fail:user:{user}")
        return d


def penalty_user(name: str) -> str:
    """The account key of a login name: trimmed, lower-case (``""`` for none)."""
    return name.strip().lower() if isinstance(name, str) else ""


class PenalisedLogin(UnauthorizedLogin):
    """A refused login and the ``delay`` (seconds) the role waits before answering it."""

    def __init__(self, delay: float) -> None:
        super().__init__("authentication failed")
        self.delay = delay


def failure_delay(failure: Failure, default: float) -> float:
    """The delay to wait before answering a failed login: the penalty's, else ``default``."""
    value = failure.value
    return value.delay if isinstance(value, PenalisedLogin) else default


class AuthGuard:
    """Checks a password under the auth penalty; one per process, used by every role.

    ``check_password(name, password, ip)`` fires with the directory's ``User``, or fails with
    ``PenalisedLogin`` (an ``UnauthorizedLogin``) carrying the delay the role must wait before
    answering (in the session, so that the wait ends with the connection): for a wrong
    password, an unknown account, and a locked-out account or address alike (then the
    password is not checked, so a correct one fails too). Other errors (the directory or the
    penalty store failing) pass through for the role to answer "temporarily unavailable".
    """

    def __init__(self, directory: IDirectory, penalty: IAuthPenalty, clock: IReactorTime) -> None:
        self.directory = directory
        self.penalty = penalty
        self.clock = clock

    def check_password(
        self, name: str, password: str | bytes, ip: str, protocol: str = ""
    ) -> defer.Deferred[Any]:
        """See the class docstring; ``protocol`` (``smtp``, ``imap``...): a failure is counted
        under it in the metrics (``mailgw_auth_failures_total``)."""
        user = penalty_user(name)
        ip = "" if ip == "-" else ip
        d: defer.Deferred[Any] = defer.maybeDeferred(self.penalty.locked, user, ip)

        def check(locked: bool) -> Any:
            if locked:
                log.info("auth refused for {user!r} from {ip}: locked out", user=user, ip=ip or "-")
                raise UnauthorizedLogin("locked out")
            return self.directory.check_password(name, password)  # type: ignore[arg-type]

        def ok(account: Any) -> Any:
            d2: defer.Deferred[Any] = defer.maybeDeferred(self.penalty.succeeded, user, ip)
            return d2.addCallback(lambda _: account)

        def failed(failure: Failure) -> Any:
            failure.trap(LoginFailed)
            if protocol:
                AUTH_FAILURES.labels(protocol).inc()
            d2: defer.Deferred[Any] = defer.maybeDeferred(self.penalty.failed, user, ip)

            def refuse(delay: float) -> None:
                raise PenalisedLogin(float(delay))

            return d2.addCallback(refuse)

        return d.addCallback(check).addCallbacks(ok, failed)


def local_auth_guard(directory: IDirectory, clock: IReactorTime, base_delay: float) -> AuthGuard:
    """A guard with its own in-memory penalty (a role built alone, as in unit tests); the
    server gives every role the node's shared one instead."""
    return AuthGuard(
        directory, MemoryAuthPenalty(clock, PenaltyPolicy(base_delay=base_delay)), clock
    )
