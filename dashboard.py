"""Blueprint ``dashboard``: the owner's pages under /forms… (the list, settings, webhook, field
builder, inbox, submissions, deliveries, exports, deletion), the landing page and the API
reference page (/api, rendered from the OpenAPI document).

Views are thin: they read a Flask-WTF form or the query string, call ``services`` and render or
redirect; values the templates show (the chart, the inbox's columns, the install snippets) are
computed here or in ``web``. They must not hold rules, SQL or Redis. Someone else's form or
submission is a 404, never a 403.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from flask import (
    Blueprint,
    abort,
    current_app,
    flash,
    g,
    redirect,
    render_template,
    request,
    stream_with_context,
    url_for,
)

import forms
import openapi
import records
import services
from web import chart_geometry, login_required

dashboard = Blueprint("dashboard", __name__)

INBOX_COLUMNS = 4  # the newest submission's first fields; the detail page shows every field
SEARCH_MAX_LENGTH = 200

# =================================================================================================
# Helpers
# =================================================================================================


def _owned_form(public_id: str) -> records.Form:
    """The logged-in owner's form, or 404 (also for someone else's form)."""
    try:
        return services.owned_form(g.user.id, public_id)
    except services.NotFound:
        abort(404)


def _owned_submission(form: records.Form, submission_id: str) -> records.Submission:
    """A submission of the owner's form, or 404."""
    try:
        return services.owned_submission(form, submission_id)
    except services.NotFound:
        abort(404)


def _webhook_section(public_id: str) -> Any:
    """Back to the webhook part of the settings page."""
    return redirect(url_for("dashboard.form_settings", public_id=public_id) + "#webhook")


def _submission_page(public_id: str, submission_id: str) -> Any:
    """Back to the submission's page."""
    return redirect(
        url_for("dashboard.submission_detail", public_id=public_id, submission_id=submission_id)
    )


def _secret_page(record: records.Form, secret: str) -> Any:
    """The settings page showing the signing secret in full, kept out of every cache."""
    response = current_app.make_response(_render_settings(record, shown_secret=secret))
    response.headers["Cache-Control"] = "no-store"
    return response


def _render_settings(
    record: records.Form,
    form: Any = None,
    webhook_form: Any = None,
    shown_secret: str | None = None,
) -> str:
    """The settings page with its two forms; the signing secret masked unless ``shown_secret``."""
    if form is None:
        form = forms.FormSettingsForm(data=forms.settings_form_data(dataclasses.asdict(record)))
    if webhook_form is None:
        webhook_form = forms.WebhookForm(data={"url": record.webhook_url or ""})
    masked = services.masked_secret(record.webhook_secret) if record.webhook_secret else None
    return render_template(
        "form_settings.html",
        form=form,
        record=record,
        webhook_form=webhook_form,
        shown_secret=shown_secret,
        masked_secret=masked,
        reveal_form=forms.ActionForm(),
    )


def _save_webhook(record: records.Form, webhook_form: forms.WebhookForm) -> Any:
    """Set or remove the webhook; a new one's signing secret is shown once."""
    url = webhook_form.url.data or None
    problem = services.check_webhook_url(url) if url else None
    if problem:
        webhook_form.url.errors.append(f"This address cannot receive webhooks: {problem}.")
        return _render_settings(record, webhook_form=webhook_form), 422
    new_secret = services.set_webhook(record, url)
    flash("Webhook saved." if url else "Webhook removed.", "success")
    if new_secret:
        return _secret_page(services.owned_form(g.user.id, record.public_id), new_secret)
    return _webhook_section(record.public_id)


def _inbox_filters() -> tuple[str, bool, int | None]:
    """The inbox's query string: search text, the spam folder, and the page's cursor."""
    query = request.args.get("q", "").strip()[:SEARCH_MAX_LENGTH]
    spam = request.args.get("spam") == "1"
    before = request.args.get("before", type=int)
    if before is not None and not 0 < before < 2**31:
        before = None  # not a cursor we hand out: start from the newest
    return query, spam, before


def _install_snippets(record: records.Form) -> dict[str, str]:
    """The install panel: the HTML and fetch() snippets rendered from their templates (as text,
    for the page to escape once more), the form's address and its hosted page."""
    data = services.install_data(record)
    return {
        "html": render_template("snippets/form.html", **data),
        "fetch": render_template("snippets/fetch.js", **data),
        "action": data["action"],
        "hosted": data["hosted"],
    }


def _download(chunks: Any, record: records.Form, extension: str, content_type: str) -> Any:
    """A streamed attachment named after the form, with exactly this Content-Type (werkzeug
    would add a second charset to a text/* ``mimetype`` that already names one)."""
    response = current_app.response_class(stream_with_context(chunks), content_type=content_type)
    response.headers["Content-Disposition"] = (
        f'attachment; filename="mailslot-{record.public_id}.{extension}"'
    )
    response.headers["Cache-Control"] = "no-store"
    return response


# =================================================================================================
# Pages anyone may read
# =================================================================================================


@dashboard.get("/")
def index() -> str:
    """The landing page: what Mailslot does."""
    return render_template("index.html")


@dashboard.get("/api")
def api_reference() -> str:
    """The API reference, rendered on the server from the OpenAPI document."""
    document = openapi.openapi_document(openapi.api_url())
    return render_template("api_reference.html", **openapi.reference_context(document))


# =================================================================================================
# Forms: list, create, settings, webhook, fields, delete
# =================================================================================================


@dashboard.get("/forms")
@login_required
def forms_index() -> str:
    """The owner's forms with submission counts and the newest submission time."""
    return render_template("forms_index.html", forms=services.list_forms(g.user.id))


@dashboard.route("/forms/new", methods=["GET", "POST"])
@login_required
def form_new() -> Any:
    """Create a form."""
    form = forms.FormSettingsForm()
    if form.validate_on_submit():
        created = services.create_form(g.user.id, forms.settings_values(form))
        flash(f"Form “{created.name}” created. Paste the snippet below into your site.", "success")
        return redirect(url_for("dashboard.form_inbox", public_id=created.public_id))
    status = 422 if form.errors else 200
    return render_template("form_settings.html", form=form, record=None), status


@dashboard.route("/forms/<pid:public_id>/settings", methods=["GET", "POST"])
@login_required
def form_settings(public_id: str) -> Any:
    """Change a form's settings."""
    record = _owned_form(public_id)
    if request.method == "GET":
        return _render_settings(record)
    form = forms.FormSettingsForm()
    if form.validate_on_submit():
        try:
            services.update_form_settings(record, forms.settings_values(form))
        except services.InvalidInput as exc:
            forms.attach_errors(form, exc.errors)
        else:
            flash("Settings saved.", "success")
            return redirect(url_for("dashboard.form_settings", public_id=public_id))
    return _render_settings(record, form=form), 422


@dashboard.post("/forms/<pid:public_id>/webhook")
@login_required
def form_webhook(public_id: str) -> Any:
    """Save, test or re-key the form's webhook (the button pressed is the form's ``action``)."""
    record = _owned_form(public_id)
    webhook_form = forms.WebhookForm()
    if not webhook_form.validate_on_submit():
        return _render_settings(record, webhook_form=webhook_form), 422
    if webhook_form.action.data == forms.WEBHOOK_TEST:
        flash(services.send_test_event(record), "info")
        return _webhook_section(public_id)
    if webhook_form.action.data == forms.WEBHOOK_ROTATE:
        flash("New signing secret created. Give it to your receiver.", "success")
        return _secret_page(record, services.rotate_webhook_secret(record))
    return _save_webhook(record, webhook_form)


@dashboard.post("/forms/<pid:public_id>/webhook/secret")
@login_required
def form_webhook_secret(public_id: str) -> Any:
    """Show the signing secret once more ("Reveal"); CSRF-checked like every POST."""
    record = _owned_form(public_id)
    secret = services.reveal_webhook_secret(record)
    if secret is None:
        flash("This form has no webhook yet.", "info")
        return _webhook_section(public_id)
    return _secret_page(record, secret)


@dashboard.route("/forms/<pid:public_id>/fields", methods=["GET", "POST"])
@login_required
def form_fields(public_id: str) -> Any:
    """The field builder: add, remove, reorder and save fields without JavaScript."""
    record = _owned_form(public_id)
    if request.method == "GET":
        form = forms.FieldsForm(data=forms.fields_form_data(record.fields or []))
        return render_template("form_fields.html", form=form, record=record)
    form = forms.FieldsForm()
    if forms.apply_builder_action(form, form.action.data):
        return render_template("form_fields.html", form=form, record=record)
    if form.validate_on_submit():
        try:
            services.save_fields(record, forms.field_specs(form))
        except services.InvalidInput as exc:
            forms.attach_errors(form, exc.errors)
        else:
            flash("Fields saved. The hosted page and validation use them from now on.", "success")
            return redirect(url_for("dashboard.form_fields", public_id=public_id))
    return render_template("form_fields.html", form=form, record=record), 422


@dashboard.route("/forms/<pid:public_id>/delete", methods=["GET", "POST"])
@login_required
def form_delete(public_id: str) -> Any:
    """Confirm, then delete a form and all its data."""
    record = _owned_form(public_id)
    form = forms.ActionForm()
    if form.validate_on_submit():
        services.delete_form(record)
        flash(f"Form “{record.name}” and its submissions were deleted.", "success")
        return redirect(url_for("dashboard.forms_index"))
    return render_template("form_delete.html", record=record, form=form)


# =================================================================================================
# The inbox, submissions and deliveries
# =================================================================================================


@dashboard.get("/forms/<pid:public_id>")
@login_required
def form_inbox(public_id: str) -> str:
    """The inbox: newest first, keyset pages, search and a spam filter; the install panel."""
    record = _owned_form(public_id)
    query, spam, before = _inbox_filters()
    rows, next_before = services.inbox_page(record, before=before, query=query, spam=spam)
    stats, per_day = services.inbox_numbers(record)
    return render_template(
        "form_inbox.html",
        record=record,
        submissions=rows,
        columns=list(rows[0].data)[:INBOX_COLUMNS] if rows else [],
        next_before=next_before,
        query=query,
        spam=spam,
        before=before,
        snippets=_install_snippets(record),
        stats=stats,
        chart=chart_geometry(per_day),
    )


@dashboard.get("/forms/<pid:public_id>/submissions/<pid:submission_id>")
@login_required
def submission_detail(public_id: str, submission_id: str) -> str:
    """One submission with every field, when and from where, and its delivery log."""
    record = _owned_form(public_id)
    submission = _owned_submission(record, submission_id)
    return render_template(
        "submission.html",
        record=record,
        submission=submission,
        deliveries=services.submission_deliveries(submission),
        action_form=forms.ActionForm(),
        verdict_form=forms.SpamVerdictForm(),
    )


@dashboard.post("/forms/<pid:public_id>/submissions/<pid:submission_id>/spam")
@login_required
def submission_mark(public_id: str, submission_id: str) -> Any:
    """Mark a submission spam or not spam."""
    record = _owned_form(public_id)
    submission = _owned_submission(record, submission_id)
    form = forms.SpamVerdictForm()
    if form.validate_on_submit():
        services.mark_spam(submission, form.spam.data)
        flash("Marked as spam." if form.spam.data else "Marked as not spam.", "success")
    return _submission_page(public_id, submission_id)


@dashboard.post("/forms/<pid:public_id>/submissions/<pid:submission_id>/delete")
@login_required
def submission_delete(public_id: str, submission_id: str) -> Any:
    """Delete one submission."""
    record = _owned_form(public_id)
    submission = _owned_submission(record, submission_id)
    if forms.ActionForm().validate_on_submit():
        services.delete_submission(submission)
        flash("Submission deleted.", "success")
    return redirect(url_for("dashboard.form_inbox", public_id=public_id))


@dashboard.post(
    "/forms/<pid:public_id>/submissions/<pid:submission_id>/deliveries/<int:delivery_id>/replay"
)
@login_required
def delivery_replay(public_id: str, submission_id: str, delivery_id: int) -> Any:
    """Send a done or dead delivery again."""
    record = _owned_form(public_id)
    submission = _owned_submission(record, submission_id)
    if forms.ActionForm().validate_on_submit():
        if not services.replay_delivery(submission, delivery_id):
            abort(404)
        flash("Delivery queued again.", "success")
    return _submission_page(public_id, submission_id)


@dashboard.get("/forms/<pid:public_id>/deliveries/dead")
@login_required
def dead_deliveries(public_id: str) -> str:
    """Deliveries that ran out of attempts, each with a way to replay it."""
    record = _owned_form(public_id)
    return render_template(
        "dead_deliveries.html",
        record=record,
        deliveries=services.dead_deliveries(record),
        action_form=forms.ActionForm(),
    )


@dashboard.get("/forms/<pid:public_id>/export.csv")
@login_required
def export_csv(public_id: str) -> Any:
    """Every submission as CSV, streamed."""
    record = _owned_form(public_id)
    return _download(services.export_csv(record), record, "csv", "text/csv; charset=utf-8")


@dashboard.get("/forms/<pid:public_id>/export.json")
@login_required
def export_json(public_id: str) -> Any:
    """Every submission as JSON, streamed."""
    record = _owned_form(public_id)
    return _download(services.export_json(record), record, "json", "application/json")
