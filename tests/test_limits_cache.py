"""Redis for speed and abuse control: the form cache, rate limits and login throttling.

Each test runs against the in-process Redis (fakeredis, the embedded default) and, when
MAILSLOT_TEST_REDIS_URL is set, against a real Redis too.
"""

from __future__ import annotations

import http.client
import math
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from flask import Flask
from flask.testing import FlaskClient
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    invariant,
    rule,
    run_state_machine_as_test,
)

import cache
import dal
import intake
import microapp
import records
import services
import users
from conftest import PASSWORD, AuthActions, csrf_token, free_port, post_form, public_refusal


@pytest.fixture(params=["fakeredis", "redis"])
def redis_backend(request: pytest.FixtureRequest, overrides: dict[str, Any]) -> str:
    """Which Redis the app talks to: in-process, or the real one given to the tests."""
    if request.param == "redis":
        overrides["redis_url"] = request.getfixturevalue("redis_url")
        overrides["celery_queue"] = f"limits-{uuid.uuid4().hex[:8]}"
    return request.param


@pytest.fixture
def app(overrides: dict[str, Any], redis_backend: str) -> Iterator[Flask]:
    """The app on SQLite with the chosen Redis."""
    app = microapp.create_app(**overrides)
    yield app
    with app.app_context():
        stores = cache.stores()
        keys = list(stores.redis.scan_iter(f"{stores.key_prefix}*"))
        if keys:
            stores.redis.delete(*keys)
        dal.database().engine.dispose()


def owner_form(app: Flask, **values: Any) -> records.Form:
    """An owner's form (notifications off: nothing to enqueue in these tests)."""
    with app.app_context():
        with dal.transaction() as conn:
            owner = dal.insert_user(conn, f"o{uuid.uuid4().hex[:8]}@example.com", "x")
        form = services.create_form(owner.id, {"name": "Cached", "notify": False, **values})
        return services.owned_form(owner.id, form.public_id)


def cache_key(app: Flask, public_id: str) -> str:
    """The form's cache key."""
    return f"{app.extensions['mailslot.settings'].redis_key_prefix}v1:form:{public_id}"


# --- the form cache ---------------------------------------------------------------------------


def test_public_lookup_fills_the_cache_with_a_ttl(app: Flask, client: FlaskClient) -> None:
    form = owner_form(app)
    assert client.get(f"/f/{form.public_id}").status_code == 200
    with app.app_context():
        r = cache.stores().redis
        key = cache_key(app, form.public_id)
        assert 0 < r.ttl(key) <= cache.FORM_CACHE_TTL
        assert '"name":"Cached"' in r.get(key)
        assert "webhook_secret" not in r.get(key)


def test_editing_a_form_drops_its_cached_entry_before_the_request_returns(
    app: Flask, client: FlaskClient
) -> None:
    auth = AuthActions(client, app)
    auth.signup()
    response = post_form(
        client, "/forms/new", {"name": "Before", "status": "active", "honeypot_field": "_gotcha"}
    )
    public_id = response.headers["Location"].rsplit("/", 1)[1]
    visitor = app.test_client()
    assert "Before" in visitor.get(f"/f/{public_id}").get_data(as_text=True)
    post_form(
        client,
        f"/forms/{public_id}/settings",
        {"name": "After", "status": "paused", "honeypot_field": "_gotcha"},
    )
    with app.app_context():
        assert cache.stores().redis.get(cache_key(app, public_id)) is None
    page = visitor.get(f"/f/{public_id}").get_data(as_text=True)
    assert "After" in page
    assert visitor.post(f"/f/{public_id}", json={"x": 1}).status_code == 403


def test_deleting_a_form_is_seen_at_once_by_the_public_endpoint(app: Flask) -> None:
    form = owner_form(app)
    visitor = app.test_client()
    assert visitor.get(f"/f/{form.public_id}").status_code == 200
    with app.app_context():
        services.delete_form(form)
    assert visitor.get(f"/f/{form.public_id}").status_code == 404
    assert visitor.post(f"/f/{form.public_id}", json={"x": 1}).status_code == 404


def test_unknown_ids_are_cached_briefly(app: Flask) -> None:
    visitor = app.test_client()
    assert visitor.get("/f/no-such-form").status_code == 404
    with app.app_context():
        assert (
            0 < cache.stores().redis.ttl(cache_key(app, "no-such-form")) <= cache.NEGATIVE_CACHE_TTL
        )


class CacheCoherence(RuleBasedStateMachine):
    """Any sequence of create/edit/pause/delete/read: the public view equals what SQL holds."""

    app: Flask
    forms = Bundle("forms")

    def __init__(self) -> None:
        super().__init__()
        self.deleted: set[str] = set()

    @rule(target=forms, name=st.text(min_size=1, max_size=20))
    def create(self, name: str) -> str:
        return owner_form(self.app, name=name).public_id

    @rule(public_id=forms, name=st.text(min_size=1, max_size=20))
    def edit(self, public_id: str, name: str) -> None:
        self._write(public_id, {"name": name})

    @rule(public_id=forms, paused=st.booleans())
    def pause(self, public_id: str, paused: bool) -> None:
        self._write(public_id, {"status": "paused" if paused else "active"})

    @rule(public_id=forms)
    def delete(self, public_id: str) -> None:
        with self.app.app_context():
            row = self._row(public_id)
            if row is not None:
                services.delete_form(row)
                self.deleted.add(public_id)

    @rule(public_id=forms)
    def read(self, public_id: str) -> None:
        self.app.test_client().get(f"/f/{public_id}")

    def _row(self, public_id: str) -> Any:
        with dal.connection() as conn:
            return dal.form_by_public_id(conn, public_id)

    def _write(self, public_id: str, values: dict[str, Any]) -> None:
        with self.app.app_context():
            row = self._row(public_id)
            if row is not None:
                services.update_form_settings(row, values)

    @invariant()
    def public_view_matches_sql(self) -> None:
        with self.app.app_context(), dal.connection() as conn:
            rows = list(conn.execute(sa.select(dal.forms)))
            for row in rows:
                seen = intake.public_form(row.public_id)
                assert (seen.name, seen.status) == (row.name, row.status)
            for public_id in self.deleted:
                with pytest.raises(intake.FormUnavailable):
                    intake.public_form(public_id)


def test_cache_stays_coherent_with_sql(app: Flask) -> None:
    CacheCoherence.app = app
    run_state_machine_as_test(
        CacheCoherence,
        settings=settings(
            max_examples=20,
            stateful_step_count=12,
            deadline=None,
            suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
        ),
    )


# --- round trips and TTLs ---------------------------------------------------------------------


class CountingRedis:
    """Wraps the app's Redis client and counts round trips (a pipeline counts once)."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.trips = 0

    def pipeline(self, *args: Any, **kwargs: Any) -> Any:
        pipe = self.inner.pipeline(*args, **kwargs)
        original = pipe.execute

        def execute(*a: Any, **k: Any) -> Any:
            self.trips += 1
            return original(*a, **k)

        pipe.execute = execute
        return pipe

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self.inner, name)
        if callable(attr):

            def counted(*args: Any, **kwargs: Any) -> Any:
                self.trips += 1
                return attr(*args, **kwargs)

            return counted
        return attr


@pytest.mark.parametrize("warm", [False, True])
def test_submission_path_makes_one_redis_round_trip_before_the_write_when_warm(
    app: Flask, warm: bool
) -> None:
    form = owner_form(app)
    visitor = app.test_client()
    if warm:
        visitor.get(f"/f/{form.public_id}")
    with app.app_context():
        counting = CountingRedis(cache.stores().redis)
        cache.stores().redis = counting  # type: ignore[assignment]
        engine = dal.database().engine
    at_write: list[int] = []

    def before_insert(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if statement.startswith("INSERT INTO submissions"):
            at_write.append(counting.trips)

    sa.event.listen(engine, "before_cursor_execute", before_insert)
    try:
        response = visitor.post(f"/f/{form.public_id}", json={"message": "hi"})
    finally:
        sa.event.remove(engine, "before_cursor_execute", before_insert)
        with app.app_context():
            cache.stores().redis = counting.inner
    assert response.status_code == 201
    assert len(at_write) == 1
    assert at_write[0] == (1 if warm else 2)  # a cold cache adds the fill
    print(f"redis_round_trips_before_write={at_write[0]} cache={'warm' if warm else 'cold'}")


def test_every_key_the_app_writes_has_a_ttl(app: Flask, client: FlaskClient) -> None:
    form = owner_form(app)
    auth = AuthActions(client, app)
    auth.signup()
    visitor = app.test_client()
    visitor.get(f"/f/{form.public_id}")
    visitor.get("/f/unknown-id")
    for n in range(3):
        visitor.post(f"/f/{form.public_id}", json={"n": n})
    visitor.post(f"/f/{form.public_id}", data={"_gotcha": "bot"})
    auth.logout()
    auth.login(password="wrong password")
    auth.login()
    client.get(f"/forms/{form.public_id}")  # not the owner: 404, but no stray keys either
    with app.app_context():
        r = cache.stores().redis
        keys = list(r.scan_iter(f"{cache.stores().key_prefix}*"))
        assert keys, "the scenario should have written keys"
        without_ttl = [key for key in keys if r.ttl(key) < 0]
    assert without_ttl == []


# --- rate limits --------------------------------------------------------------------------------


def test_posts_to_an_unknown_form_answer_404_even_past_the_limit(app: Flask) -> None:
    # Hits are counted in the same round trip as the form lookup, before the form is known;
    # an unknown address still answers 404, never 429.
    visitor = app.test_client()
    answers = {visitor.post("/f/no-such-form", json={"n": n}).status_code for n in range(30)}
    assert answers == {404}


def test_1000_rapid_submissions_from_one_ip_are_held_to_the_limit(app: Flask) -> None:
    form = owner_form(app)
    visitor = app.test_client()
    answers = [visitor.post(f"/f/{form.public_id}", json={"n": n}) for n in range(1000)]
    ok = [a for a in answers if a.status_code == 201]
    limited = [a for a in answers if a.status_code == 429]
    assert len(ok) <= 10
    assert len(ok) + len(limited) == 1000
    assert all(int(a.headers["Retry-After"]) > 0 for a in limited)
    assert limited[0].json == public_refusal(
        "too_many_requests", "Too many submissions; wait a moment and send the form again."
    )
    html = visitor.post(f"/f/{form.public_id}", data={"n": "x"}, headers={"Accept": "text/html"})
    assert html.status_code == 429
    assert "Too many submissions" in html.get_data(as_text=True)
    assert "Retry-After" in html.headers


def test_the_per_form_limit_holds_across_addresses(
    overrides: dict[str, Any], redis_backend: str
) -> None:
    app = microapp.create_app(**overrides, submit_limit_per_form_hour=5)
    form = owner_form(app)
    visitor = app.test_client()
    codes = [
        visitor.post(
            f"/f/{form.public_id}", json={"n": n}, environ_base={"REMOTE_ADDR": f"10.0.0.{n}"}
        ).status_code
        for n in range(8)
    ]
    assert codes == [201] * 5 + [429] * 3


def test_limits_can_be_switched_off_for_load_tests(
    overrides: dict[str, Any], redis_backend: str
) -> None:
    app = microapp.create_app(**overrides, rate_limits_enabled=False)
    form = owner_form(app)
    visitor = app.test_client()
    assert {visitor.post(f"/f/{form.public_id}", json={"n": n}).status_code for n in range(30)} == {
        201
    }


def test_150_wrong_passwords_get_429_and_even_the_right_one_waits(
    app: Flask, client: FlaskClient
) -> None:
    auth = AuthActions(client, app)
    auth.signup()
    auth.logout()
    codes = [auth.login(password=f"wrong {n}").status_code for n in range(150)]
    assert codes[:10] == [422] * 10
    assert set(codes[10:]) == {429}
    refused = auth.login()
    assert refused.status_code == 429
    assert int(refused.headers["Retry-After"]) > 0
    assert "Too many attempts" in refused.get_data(as_text=True)
    assert client.get("/forms").status_code == 302


def test_login_limit_answers_json_to_json_clients(app: Flask, client: FlaskClient) -> None:
    auth = AuthActions(client, app)
    auth.signup()
    auth.logout()
    for n in range(10):
        auth.login(password=f"wrong {n}")
    token_page = client.get("/login").get_data(as_text=True)
    assert "csrf_token" in token_page
    from conftest import csrf_token

    response = client.post(
        "/login",
        data={
            "email": "owner@example.com",
            "password": PASSWORD,
            "csrf_token": csrf_token(client, "/login"),
        },
        headers={"Accept": "application/json"},
    )
    assert response.status_code == 429
    assert response.json["error"]["code"] == "too_many_requests"
    assert "Retry-After" in response.headers


# --- the login throttle -------------------------------------------------------------------------

LOGIN_LIMIT, LOGIN_WINDOW = 10, 900  # the defaults: 10 attempts in 15 minutes
OWNER = "owner@example.com"


class Clock:
    """The time dal's limits count in, moved by the test."""

    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        """The current time."""
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    """A stopped clock for the limits, at an arbitrary moment."""
    stopped = Clock(1_700_000_000.25)
    monkeypatch.setattr(cache, "clock", stopped)
    return stopped


def make_owner(app: Flask) -> None:
    """The account the tests log in to (straight into the database: no sign-up flow)."""
    with app.app_context(), dal.transaction() as conn:
        dal.insert_user(conn, OWNER, users.hash_password(PASSWORD))


@pytest.fixture
def password_checks(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every password the login service checks (a counting wrapper round the real check)."""
    checked: list[str] = []
    lock = threading.Lock()
    real = users.check_password_hash

    def counting(password_hash: str, password: str) -> bool:
        with lock:
            checked.append(password)
        # A real scrypt check takes a while: the gap in which unguarded guesses pile up.
        time.sleep(0.02)
        return real(password_hash, password)

    monkeypatch.setattr(users, "check_password_hash", counting)
    return checked


def simultaneous_logins(app: Flask, passwords: list[str]) -> list[Any]:
    """POST /login with each password at the same moment, each from its own client."""
    clients = [app.test_client() for _ in passwords]
    tokens = [csrf_token(client, "/login") for client in clients]
    start = threading.Barrier(len(passwords))
    answers: list[Any] = [None] * len(passwords)

    def attempt(index: int) -> None:
        start.wait()
        answers[index] = clients[index].post(
            "/login",
            data={"email": OWNER, "password": passwords[index], "csrf_token": tokens[index]},
        )

    threads = [threading.Thread(target=attempt, args=(i,)) for i in range(len(passwords))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return answers


def assert_at_most_the_limit_checked(app: Flask, password_checks: list[str]) -> None:
    """40 simultaneous wrong passwords: exactly LOGIN_LIMIT are checked, the rest get 429."""
    make_owner(app)
    answers = simultaneous_logins(app, [f"wrong {n}" for n in range(40)])
    codes = [answer.status_code for answer in answers]
    assert len(password_checks) == LOGIN_LIMIT
    assert sorted(codes) == [422] * LOGIN_LIMIT + [429] * (40 - LOGIN_LIMIT)
    retry_after = {int(a.headers["Retry-After"]) for a in answers if a.status_code == 429}
    assert retry_after == {LOGIN_WINDOW}  # all at one moment (a stopped clock): a window away


def test_simultaneous_wrong_passwords_are_counted_before_they_are_checked(
    app: Flask, password_checks: list[str], clock: Clock
) -> None:
    assert_at_most_the_limit_checked(app, password_checks)


def test_with_redis_unreachable_simultaneous_logins_are_counted_before_too(
    redis_down_app: Flask, password_checks: list[str], clock: Clock
) -> None:
    assert_at_most_the_limit_checked(redis_down_app, password_checks)


def test_retry_after_is_when_the_oldest_attempt_leaves_the_window(
    app: Flask, client: FlaskClient, clock: Clock
) -> None:
    make_owner(app)
    auth = AuthActions(client, app)
    for n in range(LOGIN_LIMIT):
        assert auth.login(password=f"wrong {n}").status_code == 422
        clock.now += 30
    # Ten attempts 30 s apart, the first 300 s ago: it leaves the window in 600 s.
    refused = auth.login()
    assert refused.status_code == 429
    assert refused.headers["Retry-After"] == str(LOGIN_WINDOW - 300)
    clock.now += LOGIN_WINDOW - 300 - 1
    still = auth.login()
    assert still.status_code == 429
    assert still.headers["Retry-After"] == "1"
    clock.now += 1
    assert auth.login().status_code == 302  # exactly then, with the right password
    # The success took back only its own attempt: the nine later failures still count.
    auth.logout()
    assert auth.login(password="wrong again").status_code == 422
    refused = auth.login()
    assert refused.status_code == 429
    assert refused.headers["Retry-After"] == "30"  # the second failure leaves next


def test_a_right_password_does_not_clear_the_failures_of_its_address(
    app: Flask, client: FlaskClient, clock: Clock
) -> None:
    make_owner(app)
    auth = AuthActions(client, app)
    for n in range(LOGIN_LIMIT - 1):
        auth.login(email="victim@example.com", password=f"guess {n}")
    for _ in range(3):  # the attacker's own account, from the same address
        assert auth.login().status_code == 302
        auth.logout()
    assert auth.login(email="victim@example.com", password="guess 9").status_code == 422
    assert auth.login(email="victim@example.com", password="guess 10").status_code == 429


def test_an_address_limit_counts_attempts_on_every_account(
    app: Flask, client: FlaskClient, clock: Clock
) -> None:
    auth = AuthActions(client, app)
    codes = [auth.login(email=f"u{n}@example.com", password="x").status_code for n in range(12)]
    assert codes == [422] * LOGIN_LIMIT + [429] * 2


class LoginLimiter(RuleBasedStateMachine):
    """Attempts and pauses against two limits (an account's and an address's), compared with a
    model: the timestamps of the attempts that were let through."""

    def __init__(self, app: Flask, clock: Clock) -> None:
        super().__init__()
        self.app, self.clock = app, clock
        run = uuid.uuid4().hex[:8]
        self.limits = [
            cache.Limit(f"acct:{run}", 3, 60),
            cache.Limit(f"ip:{run}", 5, 100),
        ]
        self.admitted: list[tuple[float, str]] = []  # (time, ticket) still counted
        self.retry_after = 0

    def first_allowed(self) -> float:
        """The first moment from now at which the model lets an attempt through."""
        moment = self.clock.now
        for limit in self.limits:
            recent = sorted(at for at, _ in self.admitted if at > moment - limit.seconds)
            if len(recent) >= limit.count:
                moment = max(moment, recent[len(recent) - limit.count] + limit.seconds)
        return moment

    @rule(succeeds=st.booleans())
    def attempt(self, succeeds: bool) -> None:
        """An attempt: let through exactly when the model has room, else told when it has."""
        expected_at = self.first_allowed()
        with self.app.app_context():
            admission = cache.admit_attempt(self.limits)
            if admission.exceeded is None and succeeds:
                cache.withdraw_attempt(self.limits, admission.ticket)
        if expected_at == self.clock.now:
            assert admission.exceeded is None
            if not succeeds:
                self.admitted.append((self.clock.now, admission.ticket))
        else:
            assert admission.exceeded is not None
            assert admission.retry_after == math.ceil(expected_at - self.clock.now)
            self.retry_after = admission.retry_after

    @rule(seconds=st.floats(0, 150) | st.integers(0, 150))
    def wait(self, seconds: float) -> None:
        """Time passes."""
        self.clock.now += seconds

    @rule(short=st.sampled_from([0, 1]))
    def wait_for_retry_after(self, short: int) -> None:
        """Wait the last Retry-After, or one second less."""
        self.clock.now += max(self.retry_after - short, 0)
        self.retry_after = 0

    @invariant()
    def never_more_than_a_limit_in_any_window(self) -> None:
        """Any window of a limit's length holds at most its count of admitted attempts."""
        times = sorted(at for at, _ in self.admitted)
        for limit in self.limits:
            for start in times:
                inside = [at for at in times if start <= at < start + limit.seconds]
                assert len(inside) <= limit.count


def run_limiter_model(app: Flask, clock: Clock) -> None:
    """Run LoginLimiter against this app's limits."""
    run_state_machine_as_test(
        lambda: LoginLimiter(app, clock),
        settings=settings(
            max_examples=60,
            stateful_step_count=30,
            deadline=None,
            suppress_health_check=list(HealthCheck),
        ),
    )


def test_the_login_limiter_matches_its_model(app: Flask, clock: Clock) -> None:
    run_limiter_model(app, clock)


def test_with_redis_unreachable_the_login_limiter_matches_its_model(
    redis_down_app: Flask, clock: Clock
) -> None:
    run_limiter_model(redis_down_app, clock)


@settings(max_examples=1000)
@given(
    count=st.integers(1, 20),
    seconds=st.sampled_from([60, 900, 3600]),
    current=st.integers(0, 60),
    previous=st.integers(0, 60),
    into_window=st.floats(0, 1, exclude_max=True),
)
def test_the_other_limits_say_when_a_retry_fits_too(
    count: int, seconds: int, current: int, previous: int, into_window: float
) -> None:
    # Submissions, sign-ups and API calls use a sliding-window estimate (two fixed windows);
    # its Retry-After is when a retry, itself counted, first fits if nothing else comes.
    limit = cache.Limit("estimate", count, seconds)
    start = 1000 * seconds  # early in the epoch: times exact to far below a microsecond
    now = start + into_window * seconds
    refused = cache._decide([limit], [(current, previous)], now)
    assume(refused.exceeded is not None)

    def retry_fits(at: float) -> bool:
        """Whether a retry at ``at`` is let through (the counts it would meet)."""
        later = int(at // seconds) - int(now // seconds)
        counts = [(current + 1, previous), (1, current)][later] if later < 2 else (1, 0)
        return cache._decide([limit], [counts], at).exceeded is None

    assert retry_fits(now + refused.retry_after)
    assert not retry_fits(now + refused.retry_after - 1)


def test_sign_up_is_limited_per_address(overrides: dict[str, Any], redis_backend: str) -> None:
    app = microapp.create_app(**overrides, signup_limit_per_ip_hour=3)
    client = app.test_client()
    codes = [AuthActions(client, app).signup(f"s{n}@example.com").status_code for n in range(5)]
    assert codes[:3] == [302] * 3
    assert codes[3:] == [429, 429]


# --- Redis unreachable --------------------------------------------------------------------------


@pytest.fixture
def redis_down_app(overrides: dict[str, Any]) -> Flask:
    """Connected mode pointing at a port where no Redis listens."""
    return microapp.create_app(**overrides, redis_url=f"redis://127.0.0.1:{free_port()}/0")


def test_with_redis_unreachable_submissions_and_pages_still_work(redis_down_app: Flask) -> None:
    form = owner_form(redis_down_app)
    visitor = redis_down_app.test_client()
    assert visitor.get(f"/f/{form.public_id}").status_code == 200
    assert visitor.post(f"/f/{form.public_id}", json={"message": "hi"}).status_code == 201
    ready = visitor.get("/readyz")
    assert ready.status_code == 200
    assert ready.json["status"] == "degraded"
    with redis_down_app.app_context(), dal.connection() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(dal.submissions)).scalar() == 1


def test_with_redis_unreachable_an_in_process_limiter_still_holds(redis_down_app: Flask) -> None:
    form = owner_form(redis_down_app)
    visitor = redis_down_app.test_client()
    codes = [visitor.post(f"/f/{form.public_id}", json={"n": n}).status_code for n in range(15)]
    assert codes.count(201) == 10
    assert codes.count(429) == 5


def test_a_forged_x_forwarded_for_cannot_dodge_the_limit(overrides: dict[str, Any]) -> None:
    """Behind one trusted proxy hop, waitress takes the address the proxy appended."""
    import waitress.server

    app = microapp.create_app(**overrides)
    form = owner_form(app)
    server = waitress.server.create_server(
        app,
        host="127.0.0.1",
        port=0,
        trusted_proxy="127.0.0.1",
        trusted_proxy_count=1,
        trusted_proxy_headers={"x-forwarded-for"},
        clear_untrusted_proxy_headers=True,
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    port = server.effective_port  # type: ignore[union-attr]
    codes = []
    try:
        for n in range(15):
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            conn.request(
                "POST",
                f"/f/{form.public_id}",
                body='{"n": 1}',
                headers={
                    "Content-Type": "application/json",
                    "X-Forwarded-For": f"198.51.100.{n}, 203.0.113.7",
                },
            )
            codes.append(conn.getresponse().status)
            conn.close()
    finally:
        server.close()
    assert codes.count(201) == 10
    assert codes.count(429) == 5
