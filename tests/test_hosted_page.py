"""The hosted page's owner texts: description, thank-you message, and the branding footer."""

from __future__ import annotations

import pytest
from flask.testing import FlaskClient

from conftest import AuthActions, post_form


def test_owner_texts_show_escaped_and_the_footer_can_be_turned_off(
    client: FlaskClient, auth: AuthActions
) -> None:
    auth.signup()
    created = post_form(
        client,
        "/forms/new",
        {"name": "Contact", "status": "active", "honeypot_field": "_gotcha", "show_branding": "y"},
    )
    public_id = created.headers["Location"].rsplit("/", 1)[1]
    visitor = client.application.test_client()
    assert "Powered by Mailslot" in visitor.get(f"/f/{public_id}").get_data(as_text=True)
    saved = post_form(
        client,
        f"/forms/{public_id}/settings",
        {
            "name": "Contact",
            "status": "active",
            "honeypot_field": "_gotcha",
            "description": "We answer <b>within a day</b>.",
            "thanks_message": "Thanks! <script>alert(1)</script>",
            "show_branding": "",
        },
    )
    assert saved.status_code == 302
    page = visitor.get(f"/f/{public_id}").get_data(as_text=True)
    assert "We answer &lt;b&gt;within a day&lt;/b&gt;." in page
    assert "Powered by Mailslot" not in page
    thanks = visitor.get(f"/f/{public_id}/thanks").get_data(as_text=True)
    assert "Thanks! &lt;script&gt;alert(1)&lt;/script&gt;" in thanks
    assert "<script>alert(1)</script>" not in thanks
    settings_page = client.get(f"/forms/{public_id}/settings").get_data(as_text=True)
    assert "We answer &lt;b&gt;within a day&lt;/b&gt;." in settings_page


def test_settings_texts_are_limited(client: FlaskClient, auth: AuthActions) -> None:
    auth.signup()
    response = post_form(
        client,
        "/forms/new",
        {"name": "C", "status": "active", "honeypot_field": "_gotcha", "description": "x" * 2001},
    )
    assert response.status_code == 422
    assert "Use at most 2000 characters." in response.get_data(as_text=True)


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"], indirect=True)
@pytest.mark.parametrize(
    "path",
    ["/f/a%00b", "/f/a%00b/thanks", "/f/%F0%9F%98%80", "/forms/a%00b", "/forms/a%00b/settings"],
)
def test_malformed_ids_are_404_not_500(client: FlaskClient, auth: AuthActions, path: str) -> None:
    auth.signup()
    assert client.get(path).status_code == 404
    assert client.post(path, data={"x": "1"}).status_code in (404, 405)
