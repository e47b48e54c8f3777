"""Every Redis access in Mailslot: the clients, the cached form lookup, rate limits, counters,
small cached values, and the broker Redis's health.

Redis is a speed-up and an abuse brake, never a dependency: on any Redis error a form is read
through to SQL (``dal`` runs that statement), a limit falls back to an in-process one, and a
warning is logged at most once a minute. Every key is namespaced (``<prefix>v1:…``) and gets a
TTL. This module must not run SQL itself nor know about Flask requests.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import math
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import redis
import structlog
from flask import Flask, current_app

import dal
import records

if TYPE_CHECKING:
    from settings import Settings

log = structlog.get_logger("mailslot.cache")

FORM_CACHE_TTL = 300
NEGATIVE_CACHE_TTL = 30
COUNTER_TTL = 40 * 24 * 3600
STATS_TTL = 60

# =================================================================================================
# Clients
# =================================================================================================


@dataclass
class Stores:
    """What one app's cache talks to: the cache's Redis and the broker's Redis."""

    redis: redis.Redis  # cache, counters and rate limits (CACHE_REDIS_URL, else REDIS_URL)
    key_prefix: str
    embedded_redis: bool
    # The Celery broker's Redis (REDIS_URL), read only for its health; None in embedded mode.
    broker_redis: redis.Redis | None = None
    # The stand-in for Redis's rate-limit counters while Redis is unreachable (per app).
    local_windows: _LocalWindows = field(default_factory=lambda: _LocalWindows())


def make_redis(settings: Settings) -> tuple[redis.Redis, bool]:
    """The cache's Redis client, or an in-process server when REDIS_URL is empty."""
    if not settings.redis_url:
        import fakeredis  # embedded mode only: connected processes start without importing it

        return fakeredis.FakeRedis(server=fakeredis.FakeServer(), decode_responses=True), True
    return _redis_client(settings.cache_redis_url_or_default, settings), False


def _redis_client(url: str, settings: Settings) -> redis.Redis:
    """A client with short timeouts: a slow Redis never stalls a request."""
    return redis.Redis.from_url(
        url,
        socket_connect_timeout=settings.redis_timeout,
        socket_timeout=settings.redis_timeout,
        decode_responses=True,
        retry_on_timeout=False,
    )


def init_app(app: Flask, settings: Settings) -> None:
    """Attach the Redis clients to the app; no connection is opened here."""
    client, embedded = make_redis(settings)
    broker = None
    if not embedded:
        same = settings.cache_redis_url_or_default == settings.redis_url
        broker = client if same else _redis_client(settings.redis_url, settings)
    app.extensions["mailslot.cache"] = Stores(
        redis=client,
        key_prefix=settings.redis_key_prefix,
        embedded_redis=embedded,
        broker_redis=broker,
    )


def stores() -> Stores:
    """The current app's Redis clients."""
    return current_app.extensions["mailslot.cache"]


_warned_at: dict[str, float] = {}
_warn_lock = threading.Lock()


def redis_trouble(what: str, exc: BaseException) -> None:
    """Log a Redis failure as a warning, at most once a minute per kind of use."""
    now = time.monotonic()
    with _warn_lock:
        if now - _warned_at.get(what, -1e9) < 60:
            return
        _warned_at[what] = now
    log.warning("redis.unavailable", use=what, error=f"{type(exc).__name__}: {exc}"[:200])


def _key(*parts: Any) -> str:
    """A namespaced, versioned key."""
    return stores().key_prefix + "v1:" + ":".join(str(p) for p in parts)


# =================================================================================================
# The form cache (the submission path and the hosted page)
# =================================================================================================


def public_form(public_id: str) -> records.PublicForm | None:
    """A form by public id through the cache (a miss reads SQL and fills the cache)."""
    try:
        raw = stores().redis.get(_key("form", public_id))
    except (redis.RedisError, OSError) as exc:
        redis_trouble("form-cache", exc)
        return _form_from_sql(public_id)
    return _form_from_cache_or_sql(public_id, raw)


def _form_from_cache_or_sql(public_id: str, raw: str | None) -> records.PublicForm | None:
    """A cache reply decoded; on a miss the form from SQL, written to the cache (a found form
    for FORM_CACHE_TTL, an unknown id for NEGATIVE_CACHE_TTL)."""
    if raw is not None:
        data = json.loads(raw)
        return records.PublicForm(**data) if data else None
    form = _form_from_sql(public_id)
    ttl = FORM_CACHE_TTL if form is not None else NEGATIVE_CACHE_TTL
    fill = dal.json_text(dataclasses.asdict(form) if form is not None else None)
    try:
        stores().redis.set(_key("form", public_id), fill, ex=ttl)
    except (redis.RedisError, OSError) as exc:
        redis_trouble("form-cache", exc)
    return form


def _form_from_sql(public_id: str) -> records.PublicForm | None:
    """The public view of a form, read from SQL."""
    with dal.connection() as conn:
        return dal.public_view_of_form(conn, public_id)


def intake_lookup(
    public_id: str, limits: list[Limit], counters: tuple[tuple[str, int], ...] = ()
) -> tuple[records.PublicForm | None, LimitResult]:
    """The submission path's Redis work: the cached form, the limits and the counters together.

    One round trip with a warm cache; a miss reads SQL and writes the fill in a second one.
    Hits are counted before the form is known, so posts to unknown or paused forms count too.
    Redis unreachable: the form from SQL and the in-process limiter.
    """
    now = time.time()
    try:
        pipe = stores().redis.pipeline(transaction=False)
        pipe.get(_key("form", public_id))
        _queue_hits(pipe, limits, counters, now, count=True)
        replies = pipe.execute()
    except (redis.RedisError, OSError) as exc:
        redis_trouble("rate-limits", exc)
        return _form_from_sql(public_id), _hit_local(limits, now, count=True)
    form = _form_from_cache_or_sql(public_id, replies[0])
    return form, _read_hits(replies[1:], limits, counters, now, count=True)


def invalidate_form(public_id: str) -> None:
    """Drop a form's cached entry (after every write to the form)."""
    try:
        stores().redis.delete(_key("form", public_id))
    except (redis.RedisError, OSError) as exc:
        redis_trouble("form-cache", exc)


@contextmanager
def form_write(public_id: str) -> Iterator[Any]:
    """A transaction that changes a form; its cache entry is gone before this returns."""
    invalidate_form(public_id)
    with dal.transaction() as conn:
        yield conn
    invalidate_form(public_id)


# =================================================================================================
# Rate limits: sliding-window estimates
# =================================================================================================


@dataclass(frozen=True)
class Limit:
    """At most ``count`` hits per ``seconds`` for one key."""

    name: str
    count: int
    seconds: int


@dataclass
class LimitResult:
    """Which limit (if any) is exceeded, and when to try again."""

    exceeded: Limit | None = None
    retry_after: int = 0
    counters: dict[str, int] = field(default_factory=dict)


class _LocalWindows:
    """The in-process stand-in used while Redis is unreachable (per process, thread-safe)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.counts: dict[str, int] = {}
        self.logs: dict[str, dict[str, float]] = {}  # limit name -> {ticket: time}

    def incr(self, key: str) -> int:
        """Count a hit in a window; forget windows that ended."""
        with self.lock:
            if len(self.counts) > 100_000:
                self.counts.clear()
            self.counts[key] = self.counts.get(key, 0) + 1
            return self.counts[key]

    def get(self, key: str) -> int:
        """A window's count."""
        with self.lock:
            return self.counts.get(key, 0)

    def admit(self, limits: list[Limit], now: float, ticket: str) -> Admission:
        """admit_attempt's decision and record, under the lock: one step, as in Redis."""
        with self.lock:
            if len(self.logs) > 100_000:
                self.logs.clear()
            logs = []
            for limit in limits:
                log_ = self.logs.setdefault(limit.name, {})
                for old, at in list(log_.items()):
                    if at <= now - 2 * limit.seconds:
                        del log_[old]
                logs.append(list(log_.values()))
            admission = _admission(limits, logs, now, ticket)
            if admission.exceeded is None:
                for limit in limits:
                    self.logs[limit.name][ticket] = now
            return admission

    def withdraw(self, limits: list[Limit], ticket: str) -> None:
        """Take an attempt back."""
        with self.lock:
            for limit in limits:
                self.logs.get(limit.name, {}).pop(ticket, None)


_MICROS = 1_000_000  # the estimates work in whole microseconds: exact integer arithmetic


def _window(limit: Limit, now: float) -> tuple[int, int]:
    """The current fixed window's number and how far into it we are (microseconds)."""
    return divmod(round(now * _MICROS), limit.seconds * _MICROS)


def _decide(
    limits: list[Limit], counts: list[tuple[int, int]], now: float, pending: int = 0
) -> LimitResult:
    """Compare sliding-window estimates (plus ``pending`` uncounted hits) with the limits."""
    result = LimitResult()
    for limit, (current, previous) in zip(limits, counts, strict=True):
        number, into = _window(limit, now)
        span = limit.seconds * _MICROS
        result.counters[limit.name] = current
        # Sliding-window estimate: this window's hits plus the unexpired share of the last one's,
        # current + previous * (span - into) / span > count, multiplied out by span.
        if (current + pending - limit.count) * span + previous * (span - into) > 0:
            lifts = _estimate_lifts_at(limit.count, span, current, previous, number * span)
            wait = -((number * span + into - lifts) // _MICROS)
            if result.exceeded is None or wait > result.retry_after:
                result.exceeded, result.retry_after = limit, wait
    return result


def _estimate_lifts_at(count: int, span: int, current: int, previous: int, start: int) -> int:
    """The first microsecond at which one more hit fits, if no other hit comes first (the retry
    counts too); the window of ``span`` microseconds began at ``start``.

    The estimate falls as the last window's share shrinks. Within this window the retry needs
    ``previous * (span - into) <= (count - current - 1) * span``; in the next one, where this
    window is the last, ``current * (span - into) <= (count - 1) * span``.
    """
    if previous and current + 1 <= count:
        return start + span - (count - current - 1) * span // previous
    if current <= count - 1:
        return start + span
    return start + 2 * span - (count - 1) * span // current


def hit_limits(
    limits: list[Limit], *, extra_counters: tuple[tuple[str, int], ...] = ()
) -> LimitResult:
    """Count one hit against every limit (sliding windows) in ONE Redis round trip.

    ``extra_counters`` (name, seconds) are counted in the same trip and reported in
    ``counters`` (used for velocity).
    """
    now = clock()
    try:
        pipe = stores().redis.pipeline(transaction=False)
        _queue_hits(pipe, limits, extra_counters, now, count=True)
        replies = pipe.execute()
    except (redis.RedisError, OSError) as exc:
        redis_trouble("rate-limits", exc)
        return _hit_local(limits, now, count=True)
    return _read_hits(replies, limits, extra_counters, now, count=True)


def _queue_hits(
    pipe: Any,
    limits: list[Limit],
    counters: tuple[tuple[str, int], ...],
    now: float,
    *,
    count: bool,
) -> None:
    """Add the commands that count (or read) the limits' windows and the counters to ``pipe``."""
    for limit in limits:
        number, _ = _window(limit, now)
        key = _key("rl", limit.name, number)
        if count:
            pipe.incr(key)
            pipe.expire(key, limit.seconds * 2)
        else:
            pipe.get(key)
        pipe.get(_key("rl", limit.name, number - 1))
    for name, seconds in counters:
        key = _key("ct", name, int(now // seconds))
        pipe.incr(key)
        pipe.expire(key, seconds * 2)


def _read_hits(
    replies: list[Any],
    limits: list[Limit],
    counters: tuple[tuple[str, int], ...],
    now: float,
    *,
    count: bool,
) -> LimitResult:
    """The decision from the replies to ``_queue_hits``'s commands."""
    counts = []
    step = 3 if count else 2
    for i, _limit in enumerate(limits):
        current = int(replies[i * step] or 0)
        previous = int(replies[i * step + step - 1] or 0)
        counts.append((current, previous))
    result = _decide(limits, counts, now, pending=0 if count else 1)
    base = len(limits) * step
    for j, (name, _) in enumerate(counters):
        result.counters[name] = int(replies[base + j * 2])
    return result


def _hit_local(limits: list[Limit], now: float, count: bool) -> LimitResult:
    """The same decision from this app's in-process windows."""
    local = stores().local_windows
    counts = []
    for limit in limits:
        number, _ = _window(limit, now)
        key = f"{limit.name}:{number}"
        current = local.incr(key) if count else local.get(key)
        counts.append((current, local.get(f"{limit.name}:{number - 1}")))
    return _decide(limits, counts, now, pending=0 if count else 1)


# =================================================================================================
# Rate limits: attempts, exact sliding windows counted before the work they guard
# =================================================================================================
# Each limit keeps a log of the attempts it let through (a sorted set: ticket -> time). An attempt
# is admitted only while every limit's log holds fewer than `count` attempts in the last
# `seconds`, and the check and the record are one atomic step (MULTI/EXEC in Redis, a lock in
# process), so simultaneous attempts cannot all squeeze past the same last free slot.


def clock() -> float:
    """Seconds since the epoch: the time the limits count in (tests set it)."""
    return time.time()


@dataclass(frozen=True)
class Admission:
    """One attempt: counted (``exceeded`` None), or refused for the limit that is full."""

    ticket: str
    exceeded: Limit | None = None
    retry_after: int = 0  # whole seconds until one more attempt fits: exactly when it lifts


def _admission(limits: list[Limit], logs: list[list[float]], now: float, ticket: str) -> Admission:
    """The decision for an attempt at ``now`` given each limit's logged attempts (others')."""
    exceeded, lifts_at = None, now
    for limit, times in zip(limits, logs, strict=True):
        recent = sorted(at for at in times if at > now - limit.seconds)
        if len(recent) >= limit.count:
            # One more fits once all but count - 1 of them are older than the window.
            at = recent[len(recent) - limit.count] + limit.seconds
            if exceeded is None or at > lifts_at:
                exceeded, lifts_at = limit, at
    return Admission(ticket, exceeded, math.ceil(lifts_at - now))


def admit_attempt(limits: list[Limit]) -> Admission:
    """Count an attempt against every limit unless one is full: atomically, in one round trip
    (two when refused). Redis unreachable: the in-process log, under its lock."""
    now = clock()
    ticket = f"{now!r}:{uuid.uuid4().hex}"
    try:
        pipe = stores().redis.pipeline(transaction=True)
        for limit in limits:
            key = _key("log", limit.name)
            # Twice the window: an attempt still in another request's window is never dropped.
            pipe.zremrangebyscore(key, "-inf", now - 2 * limit.seconds)
            pipe.zadd(key, {ticket: now})
            pipe.zrange(key, 0, -1, withscores=True)
            pipe.expire(key, 2 * limit.seconds)
        replies = pipe.execute()
    except (redis.RedisError, OSError) as exc:
        redis_trouble("rate-limits", exc)
        return stores().local_windows.admit(limits, now, ticket)
    logs = [
        [at for member, at in replies[index * 4 + 2] if member != ticket]
        for index in range(len(limits))
    ]
    admission = _admission(limits, logs, now, ticket)
    if admission.exceeded is not None:
        withdraw_attempt(limits, ticket)
    return admission


def withdraw_attempt(limits: list[Limit], ticket: str) -> None:
    """Take an attempt back out of every limit's log (a refused one, or one that succeeded)."""
    try:
        pipe = stores().redis.pipeline(transaction=False)
        for limit in limits:
            pipe.zrem(_key("log", limit.name), ticket)
        pipe.execute()
    except (redis.RedisError, OSError) as exc:
        redis_trouble("rate-limits", exc)
    stores().local_windows.withdraw(limits, ticket)


# =================================================================================================
# Counters and small cached values
# =================================================================================================


def bump_counter(name: str) -> None:
    """Count an event (kept 40 days); a Redis failure loses a count, nothing else."""
    key = _key("count", name)
    try:
        pipe = stores().redis.pipeline(transaction=False)
        pipe.incr(key)
        pipe.expire(key, COUNTER_TTL)
        pipe.execute()
    except (redis.RedisError, OSError) as exc:
        redis_trouble("counters", exc)


def read_counter(name: str) -> int:
    """A counter's value, 0 when missing or when Redis is unreachable."""
    try:
        return int(stores().redis.get(_key("count", name)) or 0)
    except (redis.RedisError, OSError) as exc:
        redis_trouble("counters", exc)
        return 0


def cached_json(name: str, ttl: int, compute: Callable[[], Any]) -> Any:
    """A small JSON value through the cache: computed on a miss, kept ``ttl`` seconds."""
    key = _key("cache", name)
    try:
        raw = stores().redis.get(key)
        if raw is not None:
            return json.loads(raw)
    except (redis.RedisError, OSError) as exc:
        redis_trouble("cache", exc)
        return compute()
    value = compute()
    try:
        stores().redis.set(key, dal.json_text(value), ex=ttl)
    except (redis.RedisError, OSError) as exc:
        redis_trouble("cache", exc)
    return value


def drop_cached(name: str) -> None:
    """Forget a cached value."""
    try:
        stores().redis.delete(_key("cache", name))
    except (redis.RedisError, OSError) as exc:
        redis_trouble("cache", exc)


def spam_count_name(form_id: int) -> str:
    """The cached value name of a form's spam count (the inbox's stats block)."""
    return f"stats:{form_id}"


def chart_name(form_id: int, today: dt.date) -> str:
    """The cached value name of a form's chart before ``today`` (a new one each UTC day)."""
    return f"chart:{form_id}:{today.isoformat()}"


def forget_form_numbers(form_id: int) -> None:
    """Forget a form's cached spam count and chart days (the owner's change must show at once)."""
    drop_cached(spam_count_name(form_id))
    drop_cached(chart_name(form_id, dal.utcnow().date()))


# =================================================================================================
# Health
# =================================================================================================


def redis_reachable(*, broker: bool = False) -> bool:
    """True when the cache's Redis (or the broker's) answers a PING within its timeout."""
    client = stores().broker_redis if broker else stores().redis
    try:
        return client is not None and bool(client.ping())
    except (redis.RedisError, OSError):
        return False


def broker_eviction_policy() -> str | None:
    """The broker's Redis ``maxmemory-policy``; None in embedded mode or when Redis cannot say.

    CONFIG GET first; managed Redis services that forbid CONFIG report it in INFO memory.
    """
    client = stores().broker_redis
    if client is None:
        return None
    try:
        try:
            policy = client.config_get("maxmemory-policy").get("maxmemory-policy")
        except redis.ResponseError:  # CONFIG disabled, renamed or not permitted
            policy = None
        policy = policy or client.info("memory").get("maxmemory_policy")
    except (redis.RedisError, OSError) as exc:
        redis_trouble("broker-policy", exc)
        return None
    return str(policy) if policy else None
