"""Schemathesis against /api/v1/openapi.json, in process (WSGI), with a valid token.

Every check is on: not_a_server_error, status code, content type, response headers and response
schema conformance, negative_data_rejection, positive_data_acceptance, ignored_auth,
missing_required_header, unsupported_method, use_after_free and ensure_resource_availability
(the last two in the stateful run, which follows the document's links). The numbers of
operations and test cases are printed at the end of the module.
"""

from __future__ import annotations

import socket
from collections import Counter
from typing import Any

import hypothesis
import pytest
import schemathesis
from flask import Flask

import api
import dal
import services
from conftest import TEST_DATABASE_URL, WebhookReceiver, settle_deliveries

# A fixed token, stored for each test's owner, so that schemathesis sends it as configured
# (explicit) credentials in both runs and its ignored_auth probes can take it away.
TOKEN = "ms_live_schemathesis_" + "x" * 30
# Answers to valid input that are still correct: ids that do not exist (404), business rules
# JSON Schema cannot state (422: a webhook host that does not resolve, two fields with one
# name), a replay of a delivery that is not finished (409).
VALID_INPUT_STATUSES = ["2xx", "404", "409", "422"]
CONFIG = {
    "checks": {
        "enabled": True,
        "positive_data_acceptance": {"expected-statuses": VALID_INPUT_STATUSES},
    },
    "generation": {"max-examples": 40, "database": "none"},
    "phases": {"stateful": {"enabled": True}},
    "headers": {"Authorization": f"Bearer {TOKEN}"},
}
RUN: Counter[str] = Counter()
BASE_URL = "http://mailslot.test"  # the conftest app's BASE_URL


@pytest.fixture(params=["postgresql" if TEST_DATABASE_URL else "sqlite"])
def backend(request: pytest.FixtureRequest) -> str:
    """Fuzz PostgreSQL when there is one (it refuses NUL characters that SQLite stores), else
    SQLite; tests/test_api.py runs every endpoint on both. One database keeps this under ~60 s."""
    return request.param


@pytest.fixture
def overrides(overrides: dict[str, Any]) -> dict[str, Any]:
    """No rate limit in the way; webhooks may reach the local receiver."""
    return {**overrides, "api_rate_limit": "1000000/minute", "webhook_allow_private": True}


def seed(app: Flask, user_id: int, webhook_url: str) -> None:
    """The owner's data at the start of each test and each stateful scenario: one form with a
    webhook, and three submissions whose email and webhook deliveries are done."""
    with app.app_context():
        for form in services.list_forms(user_id):
            services.delete_form(form)
        form = services.create_form(
            user_id,
            {
                "name": "Fuzzed",
                "webhook_url": webhook_url,
                "webhook_secret": services.new_webhook_secret(),
            },
        )
        with dal.transaction() as conn:
            for index in range(3):
                submission = dal.insert_submission(
                    conn,
                    {
                        "public_id": services.new_public_id(),
                        "form_id": form.id,
                        "data": {"message": f"hello {index}"},
                        "schema_version": 1,
                        "meta": {},
                    },
                )
                for kind, target in (("email", "fuzz@example.com"), ("webhook", webhook_url)):
                    [delivery_id] = dal.insert_deliveries(conn, submission.id, [(kind, target)])
                    dal.finish_delivery(conn, delivery_id, "done")


@pytest.fixture
def owner_id(app: Flask, webhook_receiver: WebhookReceiver, monkeypatch: pytest.MonkeyPatch) -> int:
    """The owner of TOKEN, with seeded data; only localhost resolves (webhook URLs are fuzzed)."""
    real = socket.getaddrinfo

    def only_local(host: Any, *args: Any, **kwargs: Any) -> Any:
        if host in ("localhost", "127.0.0.1"):
            return real(host, *args, **kwargs)
        raise socket.gaierror(socket.EAI_NONAME, "not resolvable in tests")

    monkeypatch.setattr(socket, "getaddrinfo", only_local)
    with app.app_context(), dal.transaction() as conn:
        user = dal.insert_user(conn, "fuzz@example.com", "x")
        dal.mark_email_confirmed(conn, user.id, user.email)
        dal.insert_api_token(
            conn, user.id, "schemathesis", TOKEN[:12], services.hash_api_token(TOKEN)
        )
    seed(app, user.id, webhook_receiver.url)
    return user.id


class CurrentApp:
    """A WSGI app that hands each request to the app of the test that is running."""

    def __init__(self) -> None:
        self.app: Flask | None = None

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Any:
        """Forward to the current test's app."""
        assert self.app is not None, "no app: use the `served` fixture"
        return self.app(environ, start_response)


# The schema is built at import from the same function that serves /api/v1/openapi.json, and each
# test checks that its app serves exactly this document. (schemathesis.pytest.from_fixture, which
# would fetch it per test, sets ``request.node._nodeid``, which pytest 9 no longer has.)
CURRENT_APP = CurrentApp()
SCHEMA = schemathesis.openapi.from_dict(
    api.openapi_document(BASE_URL), config=schemathesis.Config.from_dict(CONFIG)
)
SCHEMA.app = CURRENT_APP


@pytest.fixture
def served(app: Flask, owner_id: int, monkeypatch: pytest.MonkeyPatch) -> Flask:
    """Send SCHEMA's requests to this test's app, which must serve exactly SCHEMA's document."""
    assert app.test_client().get("/api/v1/openapi.json").get_json() == SCHEMA.raw_schema
    monkeypatch.setattr(CURRENT_APP, "app", app)
    return app


def count(case: schemathesis.Case) -> None:
    """Count a test case for the summary."""
    RUN[case.operation.label] += 1
    RUN["cases"] += 1


@SCHEMA.parametrize()
@hypothesis.settings(deadline=None, suppress_health_check=list(hypothesis.HealthCheck))
def test_api_conforms_to_its_openapi_document(case: schemathesis.Case, served: Flask) -> None:
    count(case)
    try:
        case.call_and_validate()
    except Exception:
        RUN["failures"] += 1
        raise


def test_api_stateful_links(
    served: Flask, owner_id: int, webhook_receiver: WebhookReceiver
) -> None:
    machine = SCHEMA.as_state_machine()

    class CountingMachine(machine):  # type: ignore[valid-type, misc]
        """Starts each scenario from the seeded data, and counts each step as a test case."""

        def setup(self) -> None:
            super().setup()
            settle_deliveries(served)  # the last scenario's replays finish before its data goes
            seed(served, owner_id, webhook_receiver.url)

        def after_call(self, response: Any, case: schemathesis.Case) -> None:
            count(case)
            RUN["stateful steps"] += 1

        def validate_response(self, response: Any, case: schemathesis.Case, **kwargs: Any) -> None:
            try:
                super().validate_response(response, case, **kwargs)
            except Exception:
                RUN["failures"] += 1
                raise

    CountingMachine.run(
        settings=hypothesis.settings(
            max_examples=20,
            stateful_step_count=8,
            phases=[hypothesis.Phase.generate],
            deadline=None,
            suppress_health_check=list(hypothesis.HealthCheck),
            database=None,
        )
    )


def test_schemathesis_reached_every_operation(
    client: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    if not RUN:
        pytest.skip("run the schemathesis tests above in the same session")
    doc = client.get("/api/v1/openapi.json").get_json()
    documented = {
        f"{method.upper()} {path}" for path, methods in doc["paths"].items() for method in methods
    }
    reached = {label for label in RUN if " /" in label}
    with capsys.disabled():
        print(
            f"\nschemathesis: {len(reached)} operations, {RUN['cases']} test cases "
            f"({RUN['stateful steps']} of them stateful steps), {RUN['failures']} failing"
        )
        for label in sorted(reached):
            print(f"  {RUN[label]:5d}  {label}")
    assert reached == documented
    assert RUN["failures"] == 0
