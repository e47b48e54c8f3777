"""Blueprint ``accounts``: signing up, logging in and out, confirming the address, and the owner's
account pages (/signup, /login, /logout, /confirm/<token>, /account…).

Views are thin: they read a Flask-WTF form, call one function in ``services`` and render or
redirect. They must not hold rules, SQL or Redis; the session cookie is touched only here.
"""

from __future__ import annotations

from collections.abc import Callable
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
    session,
    url_for,
)
from werkzeug.exceptions import TooManyRequests

import forms
import records
import services
import users
from settings import current_settings
from web import login_required, safe_next

accounts = Blueprint("accounts", __name__)

# What each outcome of users.confirm_email tells the owner.
CONFIRM_MESSAGES = {
    "confirmed": ("Your email address is confirmed.", "success"),
    "already": ("Your email address was already confirmed.", "info"),
    "expired": (
        "This confirmation link has expired. Send a new one from your account.",
        "error",
    ),
    "invalid": (
        "This confirmation link is not valid. Send a new one from your account.",
        "error",
    ),
}

# =================================================================================================
# Helpers
# =================================================================================================


def _start_session(user: records.User) -> None:
    """Clear whatever the browser had and issue a fresh session for this user."""
    session.clear()
    session["uid"] = user.id
    session["sv"] = user.session_version
    session.permanent = True


def _or_429(call: Callable[..., Any], *args: Any) -> Any:
    """Run a rate-limited service call; over the limit, answer 429 with Retry-After."""
    try:
        return call(*args)
    except users.RateLimited as exc:
        raise TooManyRequests(
            "Too many attempts. Wait a few minutes and try again.", retry_after=exc.retry_after
        ) from None


# =================================================================================================
# Signing up, in and out
# =================================================================================================


@accounts.route("/signup", methods=["GET", "POST"])
def signup() -> Any:
    """Sign up, then log in: the same answer whether or not the address has an account."""
    form = forms.SignupForm()
    if request.method == "POST":
        _or_429(users.check_signup_rate, request.remote_addr)
    if form.validate_on_submit():
        users.sign_up(form.email.data, form.password.data)
        flash(
            f"Check your inbox at {users.normalise_email(form.email.data)} for a message "
            "about your account, then log in.",
            "success",
        )
        return redirect(url_for("accounts.login"))
    status = 422 if form.errors else 200
    return render_template(
        "signup.html", form=form, min_password=current_settings().password_min_length
    ), status


@accounts.route("/login", methods=["GET", "POST"])
def login() -> Any:
    """Log in with email and password; one generic message for every wrong combination."""
    form = forms.LoginForm()
    next_url = safe_next(request.args.get("next"), url_for("dashboard.forms_index"))
    if form.validate_on_submit():
        user = _or_429(users.log_in, form.email.data, form.password.data, request.remote_addr)
        if user is None:
            form.form_errors.append("Wrong email or password.")
        else:
            _start_session(user)
            return redirect(next_url)
    status = 422 if form.errors or form.form_errors else 200
    return render_template("login.html", form=form), status


@accounts.post("/logout")
def logout() -> Any:
    """End this session and every other copy of its cookie."""
    form = forms.ActionForm()
    if form.validate_on_submit() and g.user is not None:
        users.log_out(g.user.id)
    session.clear()
    flash("You are logged out.", "info")
    return redirect(url_for("dashboard.index"))


@accounts.get("/confirm/<token>")
def confirm_email(token: str) -> Any:
    """Confirm an owner's email address from the signed link we mailed."""
    message, category = CONFIRM_MESSAGES[users.confirm_email(token)]
    flash(message, category)
    return redirect(url_for("accounts.account" if g.user else "accounts.login"))


# =================================================================================================
# The account pages
# =================================================================================================


@accounts.route("/account", methods=["GET"])
@login_required
def account() -> str:
    """The owner's account: address, confirmation state, the emails we sent about it."""
    return render_template(
        "account.html",
        resend_form=forms.ActionForm(),
        account_emails=users.account_emails(g.user.id),
    )


@accounts.post("/account/emails/<int(max=2147483647):delivery_id>/replay")  # 32-bit ids in SQL
@login_required
def account_email_replay(delivery_id: int) -> Any:
    """Send a done or dead account email again (links in it are made afresh)."""
    if forms.ActionForm().validate_on_submit():
        if not users.replay_account_email(g.user.id, delivery_id):
            abort(404)
        flash("The email is queued again.", "success")
    return redirect(url_for("accounts.account"))


@accounts.route("/account/tokens", methods=["GET", "POST"])
@login_required
def account_tokens() -> Any:
    """API tokens: create one (shown once, on this answer only), list and revoke."""
    form = forms.ApiTokenForm()
    new_token = None
    if form.validate_on_submit():
        _, new_token = users.create_api_token(g.user.id, form.name.data)
        form = forms.ApiTokenForm(formdata=None)
    page = render_template(
        "account_tokens.html",
        form=form,
        new_token=new_token,
        tokens=users.list_api_tokens(g.user.id),
        revoke_form=forms.ActionForm(),
    )
    response = current_app.make_response((page, 422 if form.errors else 200))
    response.headers["Cache-Control"] = "no-store"  # the new token must not stay in any cache
    return response


@accounts.post("/account/tokens/<int(max=2147483647):token_id>/revoke")  # ids are 32-bit in SQL
@login_required
def account_token_revoke(token_id: int) -> Any:
    """Revoke a token: programs using it get 401 from the next request on."""
    if forms.ActionForm().validate_on_submit():
        if not users.revoke_api_token(g.user.id, token_id):
            abort(404)
        flash("Token revoked. Programs that use it now get 401 Unauthorized.", "success")
    return redirect(url_for("accounts.account_tokens"))


@accounts.post("/account/confirm")
@login_required
def resend_confirmation() -> Any:
    """Send the confirmation link again."""
    if forms.ActionForm().validate_on_submit():
        if _or_429(users.send_confirmation, g.user.id):
            flash(f"We sent a new confirmation link to {g.user.email}.", "success")
        else:
            flash("Your email address is already confirmed.", "info")
    return redirect(url_for("accounts.account"))


@accounts.route("/account/erase", methods=["GET", "POST"])
@login_required
def account_erase() -> Any:
    """Find, then delete, everything the owner holds about one email address."""
    form = forms.EraseForm()
    found = None
    if form.validate_on_submit():
        if form.action.data == forms.ERASE_DELETE:
            deleted = services.erase_person(g.user.id, form.email.data)
            flash(f"Deleted {deleted} submission(s) that mentioned {form.email.data}.", "success")
            return redirect(url_for("accounts.account_erase"))
        found = len(services.submissions_about(g.user.id, form.email.data))
    status = 422 if form.errors else 200
    return render_template("account_erase.html", form=form, found=found), status
