"""Blueprint ``public``: the endpoint any website's form posts to (POST/OPTIONS /f/<id>), the
form page Mailslot hosts (GET /f/<id>, POST /f/<id>/page), the thank-you page, CORS for the
form's allowed sites, the smaller body limit of submissions, and /healthz and /readyz.

JSON answers use the public envelope (see ``web``): ``{"ok": true, "id": …}`` on success,
``{"ok": false, "error": {"code", "message"}, "errors": {…}}`` on any failure.

Views only read the request into a ``intake.IntakeRequest`` and show intake's answer; they
must not hold rules (origins, limits, spam and validation live in ``services``), SQL or Redis.
"""

from __future__ import annotations

from typing import Any

from flask import (
    Blueprint,
    Flask,
    current_app,
    g,
    jsonify,
    redirect,
    render_template,
    request,
    url_for,
)
from flask_wtf.csrf import validate_csrf
from wtforms.validators import ValidationError as FormValidationError

import forms
import intake
import services
import validation
from settings import current_settings
from web import (
    MSG_PUBLIC_INVALID,
    PUBLIC_PREFIX,
    UnreadableForm,
    csrf,
    error_response,
    public_success,
    wants_json,
)

public = Blueprint("public", __name__)

_FORM_TYPES = ("application/x-www-form-urlencoded", "multipart/form-data")

# =================================================================================================
# Reading a submission
# =================================================================================================


def limit_public_bodies(sender: Flask, **_extra: Any) -> None:
    """Submission bodies have their own, smaller limit; set before anything reads the body."""
    if request.path.startswith(PUBLIC_PREFIX):
        request.max_content_length = current_settings().submission_max_bytes


def _read_payload() -> intake.Payload:
    """Parse the body of a submission, whatever kind of client sent it."""
    if request.mimetype == "application/json":
        values, problem = validation.load_json_fields(request.get_data(cache=True))
        if problem is not None:
            return intake.Payload("unreadable", problem=problem)
        return intake.Payload("json", values)
    if request.mimetype in _FORM_TYPES:
        if isinstance(request.form, UnreadableForm):
            return intake.Payload("unreadable", problem=request.form.problem)
        values = {key: items for key, items in request.form.to_dict(flat=False).items()}
        has_files = any(f.filename for f in request.files.values())
        return intake.Payload("form", values, has_files=has_files)
    return intake.Payload("unsupported")


def _intake(public_id: str, hosted: bool) -> intake.IntakeResult:
    """Run intake for this request."""
    return intake.record_submission(
        intake.IntakeRequest(
            public_id=public_id,
            payload=_read_payload(),
            origin=validation.request_header_text(request.headers.get("Origin")),
            referrer=validation.request_header_text(request.referrer),
            client_ip=request.remote_addr,
            user_agent=validation.request_header_text(request.user_agent.string),
            hosted=hosted,
        )
    )


def _open_form(public_id: str) -> Any:
    """The public form at this address (kept on ``g`` for the answer's headers), or
    FormUnavailable, which ``_refused`` answers."""
    g.public_form = intake.public_form(public_id)
    return g.public_form


def _render_hosted(record: Any, form: Any) -> str:
    """The hosted page, with a fresh signed render stamp for the spam check."""
    return render_template(
        "hosted.html",
        record=record,
        form=form,
        render_token=intake.render_token(record.public_id),
    )


def _session_csrf_valid() -> bool:
    """Whether the request carries this session's CSRF token."""
    try:
        validate_csrf(request.form.get("csrf_token"))
    except FormValidationError:
        return False
    return True


def _back_link(record: Any) -> tuple[str, str]:
    """Back to the site the submitter came from when the browser says so, else to the form."""
    came_from = validation.parse_web_url(validation.request_header_text(request.referrer))
    here = validation.parse_web_url(request.host_url)
    if came_from is not None and (
        here is None or (came_from.host, came_from.port) != (here.host, here.port)
    ):
        return came_from.url, f"Back to {came_from.host}"
    return url_for("public.hosted_page", public_id=record.public_id), "Back to the form"


@public.errorhandler(intake.FormUnavailable)
def _refused(exc: intake.FormUnavailable) -> Any:
    """Intake's refusal as a page or the public JSON envelope; 429s say when to retry."""
    response = current_app.make_response(error_response(exc.status, exc.message))
    if exc.retry_after is not None:
        response.headers["Retry-After"] = str(exc.retry_after)
    return response


# =================================================================================================
# The endpoint websites post to
# =================================================================================================


@public.post("/f/<pid:public_id>", provide_automatic_options=False)
@csrf.exempt
def submit(public_id: str) -> Any:
    """The endpoint any website's form posts to."""
    result = _intake(public_id, hosted=False)
    g.public_form = result.form
    if result.outcome == "invalid":
        if wants_json():
            return error_response(422, MSG_PUBLIC_INVALID, fields=result.errors)
        return render_template("submit_errors.html", record=result.form, errors=result.errors), 422
    if wants_json():
        return public_success(result.submission_id)
    return redirect(result.redirect_to, 303)


@public.route("/f/<pid:public_id>", methods=["OPTIONS"], provide_automatic_options=False)
@csrf.exempt
def submit_preflight(public_id: str) -> Any:
    """CORS preflight for fetch() from the form's allowed sites."""
    try:
        g.public_form = intake.public_form(public_id)
    except intake.FormUnavailable:
        g.public_form = None
    response = current_app.response_class(status=204)
    response.headers["Access-Control-Allow-Methods"] = "POST, OPTIONS"
    response.headers["Access-Control-Allow-Headers"] = "Content-Type, Accept, X-Requested-With"
    response.headers["Access-Control-Max-Age"] = "86400"
    return response


@public.after_request
def _cors(response: Any) -> Any:
    """Let allowed sites read the endpoint's answers (any site when no list is set). Any site
    may read a 5xx (the database down, say), as an unknown form's 404: looking the form up
    would fail again."""
    if request.endpoint not in ("public.submit", "public.submit_preflight"):
        return response
    response.vary.add("Origin")
    form = g.get("public_form")
    if form is None and request.view_args and response.status_code < 500:
        try:
            form = intake.public_form(request.view_args["public_id"])
        except intake.FormUnavailable:
            form = None
    allowed = intake.cors_origin(form, request.headers.get("Origin"))
    if allowed:
        response.headers["Access-Control-Allow-Origin"] = allowed
    return response


# =================================================================================================
# The hosted page and the thank-you page
# =================================================================================================


@public.get("/f/<pid:public_id>", provide_automatic_options=False)
def hosted_page(public_id: str) -> Any:
    """The form page Mailslot hosts for owners without a website."""
    record = _open_form(public_id)
    form = forms.hosted_form_class(record.fields or [])()
    return _render_hosted(record, form)


@public.post("/f/<pid:public_id>/page")
@csrf.exempt
def hosted_submit(public_id: str) -> Any:
    """The hosted page's own submit, errors shown beside each field.

    It is protected by the session's CSRF token, or by the page's signed render stamp: in a
    cross-site iframe (allowed domains may embed the page) browsers send no session cookie, and
    for an anonymous public form the stamp proves just as well that our page was filled in.
    """
    record = _open_form(public_id)
    form = forms.hosted_form_class(record.fields or [])()
    stamp = request.form.get("_rendered")
    if not (_session_csrf_valid() or intake.render_stamp_valid(stamp, record.public_id)):
        form.form_errors.append("This form expired. Reload the page and send it again.")
        return _render_hosted(record, form), 400
    result = _intake(public_id, hosted=True)
    if result.outcome == "invalid":
        forms.attach_errors(form, result.errors)
        return _render_hosted(record, form), 422
    return redirect(result.redirect_to, 303)


@public.get("/f/<pid:public_id>/thanks")
def thanks(public_id: str) -> Any:
    """Where a submitter lands when the owner set no redirect."""
    record = _open_form(public_id)
    back_url, back_label = _back_link(record)
    return render_template("thanks.html", record=record, back_url=back_url, back_label=back_label)


# =================================================================================================
# Health
# =================================================================================================


@public.get("/healthz")
def healthz() -> Any:
    """The process is up."""
    return jsonify(status="ok")


@public.get("/readyz")
def readyz() -> Any:
    """Database and Redis reachability and the mode; 503 only when the database is down."""
    report = services.readiness()
    return jsonify(report), 503 if report["status"] == "down" else 200
