"""Schemathesis against /api/v1/openapi.json, in process (WSGI), with a valid token.

Every check is on: not_a_server_error, status code, content type, response headers and response
schema conformance, negative_data_rejection, positive_data_acceptance, ignored_auth,
missing_required_header, unsupported_method, use_after_free and ensure_resource_availability
(the last two in the stateful run, which follows the document's links). The numbers of
operations and test cases are printed at the end of the module.

positive_data_acceptance judges by status alone (schemathesis does not read the documented
answers for it): a schema-valid request must get 2xx, or 404 / 409 / 422 only where the
operation's own document says why (see valid_input_statuses), and a 422 must name a field of a
rule the document lists.
"""

from __future__ import annotations

import socket
from collections import Counter
from typing import Any

import hypothesis
import pytest
import schemathesis
from flask import Flask

import api  # noqa: F401 - its resources fill the registry the document is built from
import dal
import openapi
import services
import users
from conftest import TEST_DATABASE_URL, WebhookReceiver, settle_deliveries

# A fixed token, stored for each test's owner, so that schemathesis sends it as configured
# (explicit) credentials in both runs and its ignored_auth probes can take it away.
TOKEN = "ms_live_schemathesis_" + "x" * 30


def valid_input_statuses(rule: str, spec: openapi.ApiOperation) -> list[str]:
    """What a schema-valid request to this operation may get besides 2xx: 404 for ids that do not
    exist, 409 where the operation documents a conflict, and 422 only where the document names a
    rule JSON Schema cannot state (a webhook host that must resolve to a public address, two
    fields with one name). Everything else the API checks is in the schema, so any other 422 to
    schema-valid input fails positive_data_acceptance."""
    statuses = ["2xx"]
    if "<" in rule:
        statuses.append("404")
    if spec.conflict:
        statuses.append("409")
    if spec.rules:
        statuses.append("422")
    return statuses


# The input keys that api.FORM_RULES are about, and so the only ones a 422 to valid input names.
RULE_FIELDS = {"webhook_url", "fields", "honeypot_field"} | {
    f"fields.{index}.{key}" for index in range(100) for key in ("name", "min")
}
SEEDED_FORM = "seeded-form"
ON_SEEDED_FORM = {"getForm", "updateForm", "listSubmissions"}
CONFIG = {
    "checks": {"enabled": True, "positive_data_acceptance": {"expected-statuses": ["2xx"]}},
    "generation": {"max-examples": 40, "database": "none"},
    "phases": {"stateful": {"enabled": True}},
    "headers": {"Authorization": f"Bearer {TOKEN}"},
    "operations": [
        {
            "include-operation-id": spec.id,
            "generation": {"max-examples": 100 if spec.body or spec.query else 40},
            # Most generated ids name nothing (404); these run on the seeded form instead, so
            # that their bodies and queries are judged.
            "parameters": {"form_id": SEEDED_FORM} if spec.id in ON_SEEDED_FORM else {},
            "checks": {
                "positive_data_acceptance": {"expected-statuses": valid_input_statuses(rule, spec)}
            },
        }
        for rule, _, spec in openapi._operations()
    ],
}
RUN: Counter[str] = Counter()
VALID: Counter[str] = Counter()  # schema-valid cases of the parametrized test, per operation
ACCEPTED: Counter[str] = Counter()  # ... of them answered 2xx
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
        with dal.transaction() as conn:
            form = dal.insert_form(
                conn,
                user_id,
                SEEDED_FORM,
                {
                    "name": "Fuzzed",
                    "webhook_url": webhook_url,
                    "webhook_secret": services.new_webhook_secret(),
                },
            )
            for index in range(3):
                submission = dal.insert_submission(
                    conn,
                    {
                        "public_id": dal.new_public_id(),
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
        dal.insert_api_token(conn, user.id, "schemathesis", TOKEN[:12], users.hash_api_token(TOKEN))
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
    openapi.openapi_document(f"{BASE_URL}/api/v1"), config=schemathesis.Config.from_dict(CONFIG)
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
    response = case.call()
    if case.meta is not None and case.meta.generation.mode.is_positive:
        VALID[case.operation.label] += 1
        ACCEPTED[case.operation.label] += response.status_code < 300
        if response.status_code == 422:  # only for a rule the operation's 422 answer names
            assert set(response.json()["error"]["fields"]) <= RULE_FIELDS, (
                response.text,
                case.body,
                case.query,
            )
    try:
        case.validate_response(response)
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
            valid = f"{VALID[label]} valid, {ACCEPTED[label]} answered 2xx"
            print(f"  {RUN[label]:5d}  {label}  ({valid})")
    assert reached == documented
    assert RUN["failures"] == 0
    # Valid input really is accepted, not merely answered 404 (ids that name nothing).
    for operation_id in [*ON_SEEDED_FORM, "createForm"]:
        [label] = [
            f"{method.upper()} {path}"
            for path, methods in doc["paths"].items()
            for method, spec in methods.items()
            if spec["operationId"] == operation_id
        ]
        assert ACCEPTED[label] > VALID[label] / 2, label
