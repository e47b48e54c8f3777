"""Every absolute URL Mailslot gives out: in emails, webhooks, API ``Location`` headers, the
install snippets and the OpenAPI document.

One helper, ``external_url``, builds them from the app's URL map against ``BASE_URL`` (what
``url_for(..., _external=True)`` does in a request), so it gives the same answer in a request, a
Celery task and a CLI command, and a route that moves moves its links with it. It must not build
URLs by hand, or from the request's Host header (a client chooses that).
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

from flask import current_app

from settings import current_settings


def external_url(endpoint: str, **values: Any) -> str:
    """The absolute URL of ``endpoint`` (a Flask endpoint name) with ``values``, at BASE_URL."""
    base = urlsplit(current_settings().base_url)
    adapter = current_app.url_map.bind(
        base.netloc, script_name=base.path or "/", url_scheme=base.scheme
    )
    return adapter.build(endpoint, values, force_external=True)
