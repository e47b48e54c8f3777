"""Tests for validation.py and forms.py: field schemas, submission validation, owner forms and the
hosted form."""

from __future__ import annotations

import json
import math
import re
import unicodedata
from typing import Any
from urllib.parse import urlsplit

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from werkzeug.datastructures import MultiDict

import forms
import microapp
import validation


@pytest.fixture
def app(tmp_path):
    """An app with CSRF off, so FlaskForms can be posted straight from a test request."""
    app = microapp.create_app(
        instance_path=str(tmp_path), password_hash_method="pbkdf2:sha256:1000"
    )
    app.config["WTF_CSRF_ENABLED"] = False
    return app


NAME_RULE = "Use letters, digits, _ and -, starting with a letter."
LENGTH_RULE = "Use a whole number from 1 to 10000."
MIN_OVER_MAX = "The minimum is larger than the maximum."


def spec(name: str = "f", **attributes: Any) -> dict[str, Any]:
    """A normalised field spec named `name`."""
    return validation.normalise_field_spec({"name": name, **attributes})


# =============================================================================
# Field specs
# =============================================================================


def test_normalise_field_spec_fills_defaults():
    assert validation.normalise_field_spec({"name": "email", "type": "email"}) == {
        "name": "email",
        "label": "email",
        "type": "email",
        "required": False,
        "max_length": None,
        "min": None,
        "max": None,
        "choices": [],
        "help": "",
    }


def test_normalise_field_spec_drops_attributes_the_type_does_not_use():
    normalised = validation.normalise_field_spec(
        {"name": "n", "type": "number", "max_length": 5, "choices": ["a"], "min": 1, "max": 2}
    )
    assert normalised["max_length"] is None
    assert normalised["choices"] == []
    assert (normalised["min"], normalised["max"]) == (1.0, 2.0)


def test_normalise_field_spec_cleans_choices():
    normalised = validation.normalise_field_spec(
        {"name": "c", "type": "select", "choices": [" a ", "", "a", "b", 3, "x" * 201]}
    )
    assert normalised["choices"] == ["a", "b"]


@pytest.mark.parametrize("raw", [None, [], "text", {"name": 3, "type": ["x"], "min": "1"}])
def test_normalise_field_spec_never_raises(raw):
    normalised = validation.normalise_field_spec(raw)
    assert set(normalised) == set(validation.SPEC_KEYS)
    assert normalised["type"] == "text"


def test_validate_field_specs_accepts_a_good_schema():
    specs, errors = validation.validate_field_specs(
        [
            {"name": "email", "type": "email", "required": True},
            {"name": "topic", "type": "select", "choices": ["Sales", "Support"]},
        ]
    )
    assert errors == {}
    assert [s["name"] for s in specs] == ["email", "topic"]
    assert specs[1]["choices"] == ["Sales", "Support"]


@pytest.mark.parametrize(
    ("raw", "key", "message"),
    [
        ({"fields": []}, "fields", "Send the fields as a list of objects."),
        ([{"name": f"f{i}"} for i in range(101)], "fields", "Use at most 100 fields."),
        (["name"], "fields.0", "Send each field as an object."),
        ([{"name": "_next"}], "fields.0.name", NAME_RULE),
        ([{"name": "1st"}], "fields.0.name", NAME_RULE),
        (
            [{"name": "a", "type": "file"}],
            "fields.0.type",
            f"Use one of: {', '.join(validation.FIELD_TYPES)}.",
        ),
        (
            [{"name": "a", "type": ["select"], "choices": 3}],
            "fields.0.type",
            f"Use one of: {', '.join(validation.FIELD_TYPES)}.",
        ),
        ([{"name": "a", "label": 3}], "fields.0.label", "Use text."),
        ([{"name": "a", "label": "x" * 201}], "fields.0.label", "Use at most 200 characters."),
        ([{"name": "a", "help": "x" * 1001}], "fields.0.help", "Use at most 1000 characters."),
        ([{"name": "a", "required": "yes"}], "fields.0.required", "Use true or false."),
        ([{"name": "a", "max_length": 0}], "fields.0.max_length", LENGTH_RULE),
        ([{"name": "a", "max_length": 10_001}], "fields.0.max_length", LENGTH_RULE),
        ([{"name": "a", "type": "number", "min": "1"}], "fields.0.min", "Enter a number."),
        ([{"name": "a", "type": "number", "max": math.inf}], "fields.0.max", "Enter a number."),
        ([{"name": "a", "type": "number", "min": 5, "max": 1}], "fields.0.min", MIN_OVER_MAX),
        ([{"name": "a", "type": "select"}], "fields.0.choices", "List the choices as text."),
        (
            [{"name": "a", "type": "radio", "choices": [" "]}],
            "fields.0.choices",
            "List at least one choice.",
        ),
        (
            [{"name": "a", "type": "select", "choices": ["x" * 201]}],
            "fields.0.choices",
            "Keep each choice to at most 200 characters.",
        ),
        ([{"name": "a", "requried": True}], "fields.0.requried", "Field specs have no such key."),
        ([{"name": "a"}, {"name": "a"}], "fields.1.name", "Two fields are named 'a'."),
    ],
)
def test_validate_field_specs_explains_each_problem(raw, key, message):
    specs, errors = validation.validate_field_specs(raw)
    assert specs == []
    assert message in errors[key]


# =============================================================================
# Decoding what submitters send
# =============================================================================


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("https://OK.Example/a b", None),
        ("https://OK.Example/a", ("https", "ok.example", 443, "https://ok.example/a")),
        ("http://ok.example:80/", ("http", "ok.example", 80, "http://ok.example/")),
        ("http://ok.example:8080/?q=é#x", ("http", "ok.example", 8080,
                                            "http://ok.example:8080/?q=%C3%A9#x")),
        ("https://bücher.example/", ("https", "xn--bcher-kva.example", 443,
                                     "https://xn--bcher-kva.example/")),
        ("https://\uff4f\uff4b.example/", ("https", "ok.example", 443, "https://ok.example/")),
        ("https://[::1]:8443/", ("https", "::1", 8443, "https://[::1]:8443/")),
        ("http://[", None),
        ("https://[::1", None),
        ("https://[fe80::1%25eth0]/", None),
        ("https://ok.example\uff03@evil.example/", None),
        ("https://ok.example\uff0fevil.example/", None),
        ("https://a..b/", None),
        ("https://" + "a" * 64 + ".example/", None),
        ("https://ok.example:0/", None),
        ("https://ok.example:65536/", None),
        ("https://ok.example:x/", None),
        ("https://user@ok.example/", None),
        ("https://ok.example%2f@evil.example/", None),
        ("https://ok.ex%61mple/", None),
        ("https:\\\\evil.example", None),
        ("https://ok.example/\t", None),
        ("https://ok.example/\udc80", None),
        ("ftp://ok.example/", None),
        ("javascript:alert(1)", None),
        ("/relative", None),
        ("", None),
        (None, None),
        ("https://ok.example/" + "a" * 2000, None),
        ("https://ok.example/" + "\u00e9" * 400, None),  # 2,400 characters once encoded
    ],
)  # fmt: skip
def test_parse_web_url_accepts_only_what_a_browser_reads_the_same_way(text, expected):
    url = validation.parse_web_url(text)
    if expected is None:
        assert url is None
    else:
        assert url is not None
        assert (url.scheme, url.host, url.port, url.url) == expected


def test_parse_web_url_resolves_against_a_base():
    url = validation.parse_web_url("../m?x=1", base="https://ok.example:8443/a/b/c")
    assert url is not None
    assert url.url == "https://ok.example:8443/a/m?x=1"
    assert validation.parse_web_url("http://[", base="https://ok.example/") is None
    assert (
        validation.parse_web_url("//evil.example/", base="https://ok.example/").host
        == "evil.example"
    )


_url_parts = st.sampled_from(
    ["http", "https", "HTTP", ":", "//", "/", "[", "]", "@", "%", "%2f", "?", "#", "\\", ".",
     "ok.example", "::1", "8443", "99999", "xn--", "\uff03", "\uff0f", "\u212a", "\x00", " "]
)  # fmt: skip
_url_texts = st.one_of(
    st.text(st.characters(exclude_categories=()), max_size=40),
    st.lists(st.one_of(_url_parts, st.text(max_size=3)), max_size=12).map("".join),
)


@settings(max_examples=500, deadline=None)
@given(text=_url_texts, base=st.one_of(st.none(), _url_texts))
def test_parse_web_url_never_raises_and_its_url_reads_back_the_same(text, base):
    url = validation.parse_web_url(text, base=base)
    if url is None:
        return
    assert url.url.isascii()
    assert not re.search(r"[\s\x00-\x1f\x7f\\\\]", url.url)
    assert validation.parse_web_url(url.url) == url
    assert url.port == (urlsplit(url.url).port or validation.DEFAULT_PORTS[url.scheme])


def test_decode_fields_drops_what_cannot_be_stored_and_composes_names():
    decoded = validation.decode_fields(
        {"cafe\u0301": "cre\u0300me\x00", "k\ud800": ["a\udfff"], "n": {"x\x00": 1}, "i": 3}
    )
    assert decoded == {"caf\u00e9": "cr\u00e8me", "k\ufffd": ["a\ufffd"], "n": {"x": 1}, "i": 3}


@pytest.mark.parametrize(
    ("values", "merged"),
    [
        ({"caf\u00e9": "a", "cafe\u0301": "b"}, ["a", "b"]),
        ({"caf\u00e9": ["a"], "cafe\u0301": ["b", "c"]}, ["a", "b", "c"]),
        ({"caf\u00e9": ["a"], "cafe\u0301": "b"}, ["a", "b"]),
    ],
)
def test_decode_fields_merges_names_that_compose_alike_as_repeated_names(values, merged):
    assert validation.decode_fields(values) == {"caf\u00e9": merged}


_any_text = st.text(st.characters(exclude_categories=()), max_size=20)  # surrogates included
_json_like = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), _any_text),
    lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(_any_text, inner, max_size=3)
    ),
    max_leaves=10,
)


@settings(max_examples=300, deadline=None)
@given(values=st.dictionaries(_any_text, _json_like))
def test_decode_fields_output_is_storable_and_composed(values):
    decoded = validation.decode_fields(values)
    text = json.dumps(decoded)
    json.dumps(decoded, ensure_ascii=False).encode("utf-8")  # no lone surrogates anywhere
    assert "\\u0000" not in text
    for key in decoded:
        assert key == unicodedata.normalize("NFC", key)


@pytest.mark.parametrize(
    ("body", "values", "problem"),
    [
        (b'{"a": 1}', {"a": 1}, None),
        ('{"a": "\u00e9"}'.encode("utf-16"), {"a": "\u00e9"}, None),
        (b'\xef\xbb\xbf{"a": 1}', {"a": 1}, None),
        (b'{"a": "\\ud800"}', {"a": "\ud800"}, None),
        (b'{"a": "' + b"[" * 100 + b'"}', {"a": "[" * 100}, None),
        (b'{"a": "\\"[", "b": ' + b"[" * 40 + b"]" * 40 + b"}", {}, validation.MSG_JSON_DEPTH),
        (b'{"a": "\\"' + b"[" * 100 + b"}", {}, validation.MSG_JSON),  # all inside one string
        (b'{"a": ' + b"[" * 32 + b"]" * 32 + b"}", {}, validation.MSG_JSON_DEPTH),
        (b'{"a": ' + b"[" * 31 + b"]" * 31 + b"}", {"a": json.loads("[" * 31 + "]" * 31)}, None),
        (b"[" * 100_000, {}, validation.MSG_JSON_DEPTH),
        (b'{"a": 1' + b"0" * 5000 + b"}", {}, validation.MSG_JSON),
        (b'{"a": "\xff"}', {}, validation.MSG_JSON),
        (b"[1]", {}, validation.MSG_JSON),
        (b"", {}, validation.MSG_JSON),
    ],
)
def test_load_json_fields_bounds_depth_before_parsing(body, values, problem):
    assert validation.load_json_fields(body) == (values, problem)


@settings(max_examples=300, deadline=None)
@given(
    body=st.one_of(
        st.binary(max_size=200),
        st.lists(st.sampled_from([b"[", b"]", b"{", b"}", b'"', b"\\", b":", b",", b"1", b'"a"']),
                 max_size=400).map(b"".join),
    )
)  # fmt: skip
def test_load_json_fields_never_raises(body):
    values, problem = validation.load_json_fields(body)
    assert isinstance(values, dict)
    assert problem is None or (values == {} and problem)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("Hello\r\nBcc: x@example.org", "Hello Bcc: x@example.org"),
        ("  a\t\x0b\x0c\x1c b\u2028c\x85d ", "a b c d"),
        ("a\x00b\ud800", "ab\ufffd"),
        ("\r\n", None),
        (["a"], None),
        (None, None),
    ],
)
def test_one_line_flattens_white_space_and_controls(value, expected):
    assert validation.one_line(value) == expected


@pytest.mark.parametrize(
    ("raw", "text"),
    [
        ("https://ok.example/caf\xc3\xa9", "https://ok.example/caf\u00e9"),
        ("Agent \xff", "Agent \ufffd"),
        ("a\x00b", "ab"),
        ("\u2603", "\u2603"),
        (None, ""),
    ],
)
def test_request_header_text_reads_header_bytes_as_utf8(raw, text):
    assert validation.request_header_text(raw) == text


# =============================================================================
# Submission validation: messages
# =============================================================================


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        (spec(required=True), None, "This field is required."),
        (spec(required=True), "   ", "This field is required."),
        (spec(required=True), [], "This field is required."),
        (spec(type="number", required=True), "", "This field is required."),
        (spec(max_length=5), "abcdef", "Use at most 5 characters."),
        (spec(type="textarea", max_length=3), "  abcd ", "Use at most 3 characters."),
        (spec(type="email"), "not-an-address", "Enter a valid email address."),
        (spec(type="email"), "a@b", "Enter a valid email address."),
        (spec(type="email"), "a@b.co,c@d.co", "Enter a valid email address."),
        (spec(type="email"), "a@b.co\r\nBcc: c@d.co", "Enter a valid email address."),
        (spec(type="email"), "a b@c.co", "Enter a valid email address."),
        (spec(type="email"), "a" * 250 + "@b.co", "Enter a valid email address."),
        (spec(type="email", max_length=10), "abcdef@example.com", "Use at most 10 characters."),
        (spec(type="url"), "example.com", "Enter a full http:// or https:// address."),
        (spec(type="url"), "ftp://example.com", "Enter a full http:// or https:// address."),
        (spec(type="url"), "javascript:alert(1)", "Enter a full http:// or https:// address."),
        (spec(type="url"), "http://", "Enter a full http:// or https:// address."),
        (spec(type="url"), "http://exa mple.com", "Enter a full http:// or https:// address."),
        (spec(type="url"), "http://[::1", "Enter a full http:// or https:// address."),
        (spec(type="url"), "http://example.com:port/", "Enter a full http:// or https:// address."),
        (spec(type="number"), "abc", "Enter a number."),
        (spec(type="number"), "1,5", "Enter a number."),
        (spec(type="number"), "nan", "Enter a number."),
        (spec(type="number"), "inf", "Enter a number."),
        (spec(type="number"), "1e999", "Enter a number."),
        (spec(type="number"), "9" * 5000, "Enter a number."),
        (spec(type="number"), "٣", "Enter a number."),
        (spec(type="number"), True, "Enter a number."),
        (spec(type="number"), math.nan, "Enter a number."),
        (spec(type="number"), 2**2000, "Enter a number."),
        (spec(type="number", min=1), "0", "Use a number of at least 1."),
        (spec(type="number", min=0.5), 0.25, "Use a number of at least 0.5."),
        (spec(type="number", min=1234567), 1, "Use a number of at least 1234567."),
        (spec(type="number", max=10), "10.5", "Use a number of at most 10."),
        (spec(type="date"), "2024-13-01", "Enter a date as YYYY-MM-DD."),
        (spec(type="date"), "2023-02-29", "Enter a date as YYYY-MM-DD."),
        (spec(type="date"), "20240101", "Enter a date as YYYY-MM-DD."),
        (spec(type="date"), "1/2/2024", "Enter a date as YYYY-MM-DD."),
        (spec(type="select", choices=["a", "b"]), "c", "Choose one of the listed options."),
        (spec(type="radio", choices=["1", "2"]), 3, "Choose one of the listed options."),
        (spec(type="checkbox"), "maybe", "Tick the box or leave it empty."),
        (spec(type="checkbox"), 2, "Tick the box or leave it empty."),
        (spec(type="checkbox", required=True), "off", "This box must be ticked."),
        (spec(type="checkbox", required=True), None, "This box must be ticked."),
        (spec(), ["a", "b"], "Send one value for this field."),
        (spec(), {"a": "b"}, "Send a plain value, not an object or list."),
        (spec(), [{"a": "b"}], "Send a plain value, not an object or list."),
        (spec(), [["a"]], "Send a plain value, not an object or list."),
        (spec(), b"bytes", "Send a plain value, not an object or list."),
        (spec(), "x" * 10_001, "Use at most 10000 characters."),
    ],
)
def test_submitted_values_that_break_the_schema_are_refused(field, value, message):
    clean, errors = validation.validate_submission([field], {"f": value}, strict=True)
    assert clean == {}
    assert errors == {"f": [message]}


def test_a_missing_required_field_is_refused():
    clean, errors = validation.validate_submission([spec("email", required=True)], {}, strict=False)
    assert (clean, errors) == ({}, {"email": ["This field is required."]})


def test_value_length_limit_is_configurable():
    _, errors = validation.validate_submission(
        [], {"a": "x" * 11}, strict=False, max_value_length=10
    )
    assert errors == {"a": ["Use at most 10 characters."]}


def test_too_many_fields_are_refused():
    data = {f"k{i}": "v" for i in range(4)}
    clean, errors = validation.validate_submission([], data, strict=False, max_fields=3)
    assert (clean, errors) == ({}, {"_form": ["Too many fields: at most 3."]})


def test_control_fields_do_not_count_towards_the_field_limit():
    data = {"a": "1", "_next": "x", "_subject": "y", "_gotcha": ""}
    clean, errors = validation.validate_submission([], data, strict=False, max_fields=1)
    assert (clean, errors) == ({"a": "1"}, {})


@pytest.mark.parametrize(
    ("key", "message"),
    [
        ("k" * 101, "Field names can be at most 100 characters."),
        ("a\x00b", "Field names can contain only printable characters."),
        ("a\nb", "Field names can contain only printable characters."),
    ],
)
def test_unusable_field_names_are_refused(key, message):
    clean, errors = validation.validate_submission([], {key: "v", "ok": "v"}, strict=False)
    assert (clean, errors) == ({}, {"_form": [message]})


@pytest.mark.parametrize("data", [["a", "b"], "a=b", None, 3])
def test_data_that_is_not_a_mapping_is_refused(data):
    clean, errors = validation.validate_submission([], data, strict=False)
    assert (clean, errors) == ({}, {"_form": ["Send the fields as names with values."]})


# =============================================================================
# Submission validation: clean data
# =============================================================================


@pytest.mark.parametrize(
    ("field", "value", "expected"),
    [
        (spec(), "  hi  ", "hi"),
        (spec(), ["  hi "], "hi"),
        (spec(), 5, "5"),
        (spec(), True, "true"),
        (spec(), "a\x00b", "ab"),
        (spec(), "a\ud800b", "a\ufffdb"),
        (spec(type="textarea", max_length=3), " abc\n", "abc"),
        (spec(type="email"), " Ann.Lee@Example.COM ", "Ann.Lee@example.com"),
        (spec(type="url"), " https://Example.com/a?b=c ", "https://Example.com/a?b=c"),
        (spec(type="number"), "42", 42),
        (spec(type="number"), "+7", 7),
        (spec(type="number"), "-3.5", -3.5),
        (spec(type="number"), ".5", 0.5),
        (spec(type="number"), "1e3", 1000.0),
        (spec(type="number"), 7, 7),
        (spec(type="number"), 2.5, 2.5),
        (spec(type="number", min=0, max=10), "10", 10),
        (spec(type="number", min=0, max=10), "0", 0),
        (spec(type="date"), "2024-02-29", "2024-02-29"),
        (spec(type="select", choices=["a", "b"]), " b ", "b"),
        (spec(type="radio", choices=["1", "2"]), 2, "2"),
        (spec(type="checkbox"), "on", True),
        (spec(type="checkbox"), "TRUE", True),
        (spec(type="checkbox"), "1", True),
        (spec(type="checkbox"), "Yes", True),
        (spec(type="checkbox"), True, True),
        (spec(type="checkbox"), 1, True),
        (spec(type="checkbox"), "", False),
        (spec(type="checkbox"), "off", False),
        (spec(type="checkbox"), "False", False),
        (spec(type="checkbox"), "0", False),
        (spec(type="checkbox"), "no", False),
        (spec(type="checkbox"), False, False),
        (spec(type="checkbox"), 0, False),
        (spec(type="checkbox", required=True), ["on"], True),
    ],
)
def test_valid_values_are_normalised(field, value, expected):
    clean, errors = validation.validate_submission([field], {"f": value}, strict=True)
    assert errors == {}
    assert clean == {"f": expected}
    assert type(clean["f"]) is type(expected)


@pytest.mark.parametrize("value", [None, "", "   ", []])
def test_optional_fields_left_empty_are_omitted(value):
    schema = [spec("a"), spec("n", type="number"), spec("box", type="checkbox")]
    data = {"a": value, "n": value, "box": value}
    assert validation.validate_submission(schema, data, strict=True) == ({"box": False}, {})


def test_an_unticked_optional_checkbox_is_stored_as_false():
    clean, errors = validation.validate_submission([spec("box", type="checkbox")], {}, strict=True)
    assert (clean, errors) == ({"box": False}, {})


def test_empty_schema_accepts_any_fields_and_normalises_them():
    data = {"a": " x ", "n": 3, "f": 1.5, "b": True, "z": None, "l": [" v "], "e": []}
    clean, errors = validation.validate_submission([], data, strict=True)
    assert errors == {}
    assert clean == {"a": "x", "n": 3, "f": 1.5, "b": True, "z": "", "l": "v"}


def test_empty_schema_still_refuses_objects_and_repeated_values():
    _, errors = validation.validate_submission([], {"o": {"k": 1}, "m": ["1", "2"]}, strict=False)
    assert errors == {
        "o": ["Send a plain value, not an object or list."],
        "m": ["Send one value for this field."],
    }


def test_control_fields_are_ignored():
    schema = [spec("a")]
    data = {"a": "1", "_next": "https://evil.example", "_gotcha": "", "_replyto": "x"}
    assert validation.validate_submission(schema, data, strict=True) == ({"a": "1"}, {})


def test_strict_mode_refuses_unknown_fields():
    clean, errors = validation.validate_submission(
        [spec("a")], {"a": "1", "b": "2", "c": {"x": 1}}, strict=True
    )
    assert clean == {}
    assert errors == {
        "b": ["This form has no field with this name."],
        "c": ["This form has no field with this name."],
    }


def test_lenient_mode_keeps_unknown_fields():
    clean, errors = validation.validate_submission(
        [spec("a")], {"a": "1", "b": " 2 "}, strict=False
    )
    assert (clean, errors) == ({"a": "1", "b": "2"}, {})


def test_clean_data_keeps_schema_order_then_unknown_fields_in_input_order():
    schema = [spec("first"), spec("second"), spec("third", type="checkbox")]
    data = {"zeta": "z", "second": "2", "alpha": "a", "first": "1"}
    clean, _ = validation.validate_submission(schema, data, strict=False)
    assert list(clean) == ["first", "second", "third", "zeta", "alpha"]


def test_any_error_means_no_clean_data():
    schema = [spec("a"), spec("n", type="number")]
    clean, errors = validation.validate_submission(schema, {"a": "fine", "n": "x"}, strict=False)
    assert clean == {}
    assert errors == {"n": ["Enter a number."]}


def test_every_error_is_reported_at_once():
    schema = [spec("a", required=True), spec("e", type="email"), spec("d", type="date")]
    _, errors = validation.validate_submission(schema, {"e": "x", "d": "y"}, strict=True)
    assert set(errors) == {"a", "e", "d"}


def test_unusable_schema_entries_are_skipped():
    schema = [None, "x", {"name": "_secret"}, {"name": "ok", "type": "bogus", "min": "low"}]
    clean, errors = validation.validate_submission(schema, {"ok": " v "}, strict=True)
    assert (clean, errors) == ({"ok": "v"}, {})


def test_default_fields_validate_the_default_hosted_form():
    clean, errors = validation.validate_submission(
        validation.DEFAULT_FIELDS,
        {"name": "Ann", "email": "ann@example.com", "message": "Hello"},
        strict=True,
    )
    assert errors == {}
    assert clean == {"name": "Ann", "email": "ann@example.com", "message": "Hello"}
    _, errors = validation.validate_submission(
        validation.DEFAULT_FIELDS, {"name": "Ann"}, strict=True
    )
    assert errors == {
        "email": ["This field is required."],
        "message": ["This field is required."],
    }


# =============================================================================
# Submission validation: properties
# =============================================================================

_names = st.from_regex(r"[A-Za-z][A-Za-z0-9_-]{0,8}", fullmatch=True)
_choice = st.text(st.characters(codec="utf-8"), min_size=1, max_size=8).map(str.strip).filter(bool)
_bound = st.one_of(st.none(), st.integers(-1000, 1000), st.floats(-1e6, 1e6, allow_nan=False))
_interesting = st.sampled_from(
    [
        "on",
        "off",
        "yes",
        "true",
        "2024-02-29",
        "a@b.co",
        "https://x.org/",
        "12",
        "-3.5",
        "1e3",
        "",
        " ",
        "nan",
        "ümlaut",
        "x" * 60,
        "a\x00b",
        "\ud800x",
    ]
)


@st.composite
def valid_field_specs(draw: st.DrawFn) -> dict[str, Any]:
    """One valid, normalised field spec."""
    kind = draw(st.sampled_from(validation.FIELD_TYPES))
    raw: dict[str, Any] = {
        "name": draw(_names),
        "type": kind,
        "required": draw(st.booleans()),
        "label": draw(st.text(max_size=10)),
    }
    if kind in validation.TEXT_TYPES:
        raw["max_length"] = draw(st.none() | st.integers(1, 40))
    if kind == "number":
        low, high = draw(_bound), draw(_bound)
        if low is not None and high is not None and low > high:
            low, high = high, low
        raw["min"], raw["max"] = low, high
    if kind in validation.CHOICE_TYPES:
        raw["choices"] = draw(st.lists(_choice, min_size=1, max_size=4, unique=True))
    return validation.normalise_field_spec(raw)


_schemas = st.lists(valid_field_specs(), max_size=6, unique_by=lambda s: s["name"])


@st.composite
def submissions(draw: st.DrawFn) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """A schema and a mapping to submit against it: anything a client could send, and worse."""
    schema = draw(_schemas)
    names = [s["name"] for s in schema]
    choices = [c for s in schema for c in s["choices"]]
    scalar = st.one_of(
        st.text(max_size=20),
        st.integers(),
        st.floats(),
        st.booleans(),
        st.none(),
        _interesting,
        *([st.sampled_from(choices)] if choices else []),
    )
    value = st.one_of(
        scalar,
        st.lists(scalar, max_size=3),
        st.dictionaries(st.text(max_size=3), scalar, max_size=2),
        st.lists(st.dictionaries(st.text(max_size=3), scalar, max_size=2), max_size=2),
    )
    key = st.one_of(st.sampled_from(names), st.text(max_size=8)) if names else st.text(max_size=8)
    return schema, draw(st.dictionaries(key, value, max_size=8))


def assert_fits_schema(schema: list[dict[str, Any]], clean: dict[str, Any]) -> None:
    """Clean data holds every required field, and each value is of its field's kind."""
    for field in schema:
        name = field["name"]
        if field["required"] or field["type"] == "checkbox":
            assert name in clean
        if name not in clean:
            continue
        value = clean[name]
        kind = field["type"]
        if kind == "checkbox":
            assert isinstance(value, bool)
            assert value or not field["required"]
        elif kind == "number":
            assert isinstance(value, int | float)
            assert not isinstance(value, bool)
            assert math.isfinite(value)
            assert field["min"] is None or value >= field["min"]
            assert field["max"] is None or value <= field["max"]
        else:
            assert isinstance(value, str)
            assert value
            assert value == value.strip()
            if field["max_length"] is not None:
                assert len(value) <= field["max_length"]
            if kind in validation.CHOICE_TYPES:
                assert value in field["choices"]
            if kind == "email":
                assert value.count("@") == 1
                assert "\n" not in value
            if kind == "date":
                assert re.fullmatch(r"[0-9]{4}-[0-9]{2}-[0-9]{2}", value)
            if kind == "url":
                assert urlsplit(value).scheme.lower() in {"http", "https"}


@settings(max_examples=200, deadline=None)
@given(case=submissions(), strict=st.booleans())
def test_validate_submission_never_raises_and_clean_data_fits_the_schema(case, strict):
    schema, data = case
    clean, errors = validation.validate_submission(schema, data, strict=strict)
    assert isinstance(clean, dict)
    assert isinstance(errors, dict)
    if errors:
        assert clean == {}
        for messages in errors.values():
            assert messages
            assert all(isinstance(m, str) and m for m in messages)
        return
    assert_fits_schema(schema, clean)
    json.dumps(clean, allow_nan=False).encode("utf-8")
    assert not any(isinstance(value, str) and "\x00" in value for value in clean.values())
    schema_names = {field["name"] for field in schema}
    assert all(not key.startswith("_") for key in clean)
    if strict and schema:
        assert set(clean) <= schema_names


_unknown_keys = st.text(
    st.characters(codec="utf-8", exclude_categories=("Cc",)), min_size=1, max_size=20
).filter(lambda k: not k.startswith("_"))


@settings(max_examples=200, deadline=None)
@given(
    schema=st.lists(valid_field_specs(), min_size=1, max_size=5, unique_by=lambda s: s["name"]),
    key=_unknown_keys,
    value=st.text(st.characters(codec="utf-8", exclude_characters="\x00"), max_size=30),
)
def test_lenient_mode_keeps_unknown_keys_and_strict_mode_refuses_them(schema, key, value):
    optional_schema = [{**field, "required": False} for field in schema]
    assume(key not in {field["name"] for field in schema})
    clean, errors = validation.validate_submission(optional_schema, {key: value}, strict=False)
    assert errors == {}
    assert clean[key] == value.strip()
    clean, errors = validation.validate_submission(optional_schema, {key: value}, strict=True)
    assert (clean, errors) == ({}, {key: ["This form has no field with this name."]})


# =============================================================================
# Owner forms: form settings
# =============================================================================


def post_settings(app, **overrides: str) -> tuple[bool, dict[str, Any], dict[str, Any] | None]:
    """Post the settings form; return (valid, errors, settings_values or None)."""
    data = {
        "name": "Contact",
        "redirect_url": "",
        "allowed_domains": "",
        "notify": "y",
        "status": "active",
        "honeypot_field": "_gotcha",
        **overrides,
    }
    with app.test_request_context(method="POST", data=data):
        form = forms.FormSettingsForm()
        valid = form.validate()
        return valid, form.errors, forms.settings_values(form) if valid else None


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("name", "  ", "Give the form a name."),
        ("name", "x" * 201, "Use at most 200 characters."),
        ("redirect_url", "/thanks", "Use a full http:// or https:// address."),
        ("redirect_url", "example.com/thanks", "Use a full http:// or https:// address."),
        ("redirect_url", "javascript:alert(1)", "Use a full http:// or https:// address."),
        ("redirect_url", "https://x.org/" + "a" * 2000, "Use at most 2000 characters."),
        (
            "allowed_domains",
            "example.com\nhttps://example.org/",
            "'https://example.org/' is not a host name. Write one host a line, like example.com.",
        ),
        (
            "allowed_domains",
            "example.com/path",
            "'example.com/path' is not a host name. Write one host a line, like example.com.",
        ),
        (
            "allowed_domains",
            "com",
            "'com' is not a host name. Write one host a line, like example.com.",
        ),
        (
            "allowed_domains",
            "example.com:0",
            "'example.com:0' is not a host name. Write one host a line, like example.com.",
        ),
        (
            "allowed_domains",
            "*.example.com",
            "'*.example.com' is not a host name. Write one host a line, like example.com.",
        ),
        (
            "allowed_domains",
            "\n".join(f"site{i}.example.com" for i in range(51)),
            "List at most 50 hosts.",
        ),
        ("status", "deleted", "Choose active or paused."),
        ("honeypot_field", "", "Use letters, digits, _ and - (start with a letter or _)."),
        ("honeypot_field", "1trap", "Use letters, digits, _ and - (start with a letter or _)."),
        ("honeypot_field", "a trap", "Use letters, digits, _ and - (start with a letter or _)."),
        (
            "honeypot_field",
            "_next",
            "'_next' is already a control field. Choose another name, like _gotcha.",
        ),
    ],
)
def test_form_settings_explain_what_is_wrong(app, field, value, message):
    valid, errors, _ = post_settings(app, **{field: value})
    assert not valid
    assert errors[field] == [message]


def test_form_settings_values_are_cleaned(app):
    valid, errors, values = post_settings(
        app,
        name="  Contact us ",
        redirect_url=" https://example.com/thanks ",
        allowed_domains="Example.COM\n\n  www.example.com:8080 \nexample.com\nlocalhost:5000\n",
        status="paused",
        honeypot_field="website",
        strict="y",
        blocked_words=" casino \n\nfree money\n",
        blocked_email_domains="@Spam.example\n",
    )
    assert valid, errors
    assert values == {
        "name": "Contact us",
        "redirect_url": "https://example.com/thanks",
        "allowed_domains": ["example.com", "www.example.com:8080", "localhost:5000"],
        "notify": True,
        "status": "paused",
        "honeypot_field": "website",
        "strict": True,
        "spam_rules": {"words": ["casino", "free money"], "email_domains": ["spam.example"]},
        "retention_days": None,
        "description": "",
        "thanks_message": "",
        "show_branding": False,
    }


def test_form_settings_blank_redirect_is_none_and_unticked_boxes_are_false(app):
    valid, _, values = post_settings(app, notify="")
    assert valid
    assert values["redirect_url"] is None
    assert values["allowed_domains"] == []
    assert values["notify"] is False
    assert values["strict"] is False


def test_form_settings_defaults_on_a_new_form(app):
    with app.test_request_context():
        form = forms.FormSettingsForm()
        assert form.notify.data is True
        assert form.status.data == "active"
        assert form.honeypot_field.data == "_gotcha"
        assert form.strict.label.text == "Strict schema: refuse fields the schema does not name"


def test_form_settings_round_trip_through_stored_values(app):
    stored = {
        "name": "Contact",
        "redirect_url": None,
        "allowed_domains": ["example.com", "www.example.com"],
        "notify": False,
        "status": "paused",
        "honeypot_field": "_trap",
        "strict": True,
        "spam_rules": {"words": ["casino"], "email_domains": ["spam.example"]},
        "retention_days": 30,
        "description": "About us",
        "thanks_message": "Thanks!",
        "show_branding": True,
    }
    with app.test_request_context():
        form = forms.FormSettingsForm(data=forms.settings_form_data(stored))
        assert form.allowed_domains.data == "example.com\nwww.example.com"
        assert form.validate()
        assert forms.settings_values(form) == stored


@pytest.mark.parametrize(
    ("text", "hosts"),
    [
        ("", []),
        (None, []),
        ("  \n\n", []),
        ("Example.com", ["example.com"]),
        ("a.example.com\r\nb.example.com", ["a.example.com", "b.example.com"]),
        ("localhost", ["localhost"]),
        ("localhost:8000", ["localhost:8000"]),
        ("127.0.0.1:5000", ["127.0.0.1:5000"]),
        ("bücher.de", ["xn--bcher-kva.de"]),
        ("example.com\nEXAMPLE.com", ["example.com"]),
    ],
)
def test_parse_allowed_domains_reads_one_host_a_line(text, hosts):
    assert validation.parse_allowed_domains(text) == hosts


@pytest.mark.parametrize(
    "line",
    [
        "http://example.com",
        "example.com/",
        "user@example.com",
        "-bad.example.com",
        "a..b",
        "ex ample.com",
        "example.com:99999",
    ],
)
def test_parse_allowed_domains_refuses_lines_that_are_not_hosts(line):
    with pytest.raises(ValueError, match="is not a host name"):
        validation.parse_allowed_domains(f"example.com\n{line}")


# =============================================================================
# Owner forms: the field builder
# =============================================================================


def builder_data(*rows: dict[str, str]) -> MultiDict:
    """The builder's POST body for these rows (each row's keys are FieldSpecForm field names)."""
    data = MultiDict()
    for index, row in enumerate(rows):
        for key, value in {"type": "text", **row}.items():
            data.add(f"fields-{index}-{key}", value)
    return data


def row_names(form: forms.FieldsForm) -> list[str | None]:
    """The name typed in each builder row."""
    return [entry.form["name"].data for entry in form.fields]


@pytest.mark.parametrize(
    ("row", "field", "message"),
    [
        ({"name": ""}, "name", "Give the field a name."),
        ({"name": "_next"}, "name", "Use letters, digits, _ and -, starting with a letter."),
        ({"name": "first name"}, "name", "Use letters, digits, _ and -, starting with a letter."),
        ({"name": "9lives"}, "name", "Use letters, digits, _ and -, starting with a letter."),
        ({"name": "a", "type": "file"}, "type", "Choose a field type from the list."),
        ({"name": "a", "label": "x" * 201}, "label", "Use at most 200 characters."),
        ({"name": "a", "help": "x" * 1001}, "help", "Use at most 1000 characters."),
        ({"name": "a", "max_length": "0"}, "max_length", "Use a whole number from 1 to 10000."),
        ({"name": "a", "max_length": "ten"}, "max_length", "Use a whole number from 1 to 10000."),
        ({"name": "a", "type": "number", "min": "low"}, "min", "Enter a number."),
        ({"name": "a", "type": "number", "max": "inf"}, "max", "Enter a number."),
        (
            {"name": "a", "type": "number", "min": "5", "max": "1"},
            "min",
            "The minimum is larger than the maximum.",
        ),
        (
            {"name": "a", "type": "select", "choices": " \n "},
            "choices",
            "List at least one choice, one a line.",
        ),
        ({"name": "a", "type": "radio"}, "choices", "List at least one choice, one a line."),
        (
            {"name": "a", "type": "select", "choices": "x" * 201},
            "choices",
            "Keep each choice to at most 200 characters.",
        ),
    ],
)
def test_field_builder_rows_explain_what_is_wrong(app, row, field, message):
    with app.test_request_context(method="POST", data=builder_data(row)):
        form = forms.FieldsForm()
        assert not form.validate()
        assert form.errors["fields"][0][field] == [message]


def test_field_builder_refuses_two_fields_with_one_name(app):
    data = builder_data({"name": "email"}, {"name": "topic"}, {"name": "email"})
    with app.test_request_context(method="POST", data=data):
        form = forms.FieldsForm()
        assert not form.validate()
        assert form.fields[2].form["name"].errors == ["Two fields are named 'email'."]
        assert form.errors["fields"][2] == {"name": ["Two fields are named 'email'."]}
        assert form.fields[0].form["name"].errors == []


def test_field_builder_saves_normalised_specs(app):
    data = builder_data(
        {"name": "email", "type": "email", "required": "y", "label": " Your email "},
        {"name": "topic", "type": "radio", "choices": "Sales\r\n\r\n Support \nSales", "min": "3"},
        {"name": "age", "type": "number", "min": "0", "max": "130", "max_length": "5"},
    )
    with app.test_request_context(method="POST", data=data):
        form = forms.FieldsForm()
        assert not forms.apply_builder_action(form, "save")
        assert form.validate(), form.errors
        specs = forms.field_specs(form)
    assert specs == [
        spec("email", type="email", required=True, label="Your email"),
        spec("topic", type="radio", choices=["Sales", "Support"]),
        spec("age", type="number", min=0, max=130),
    ]


@pytest.mark.parametrize(
    ("action", "names"),
    [
        ("add", ["a", "b", "c", None]),
        ("remove-0", ["b", "c"]),
        ("remove-2", ["a", "b"]),
        ("remove-7", ["a", "b", "c"]),
        ("up-1", ["b", "a", "c"]),
        ("up-0", ["a", "b", "c"]),
        ("down-1", ["a", "c", "b"]),
        ("down-2", ["a", "b", "c"]),
        ("", ["a", "b", "c"]),
        ("explode", ["a", "b", "c"]),
    ],
)
def test_field_builder_buttons_edit_rows_without_saving(app, action, names):
    data = builder_data({"name": "a"}, {"name": "b"}, {"name": "c"})
    with app.test_request_context(method="POST", data=data):
        form = forms.FieldsForm()
        assert forms.apply_builder_action(form, action) is True
        assert row_names(form) == names
        assert [entry.name for entry in form.fields] == [f"fields-{i}" for i in range(len(names))]


def test_field_builder_moves_keep_what_was_typed(app):
    data = builder_data(
        {"name": "a", "type": "number", "max_length": "oops", "required": "y", "min": "1.5"},
        {"name": "b", "type": "select", "choices": "x\ny", "help": " tip "},
    )
    with app.test_request_context(method="POST", data=data):
        form = forms.FieldsForm()
        forms.apply_builder_action(form, "down-0")
        first, second = (entry.form for entry in form.fields)
        assert (first["name"].data, first["type"].data, first["choices"].data) == (
            "b",
            "select",
            "x\ny",
        )
        assert first["required"].data is False
        assert second["required"].data is True
        assert second["max_length"]._value() == "oops"
        assert second["min"].data == 1.5
        assert 'value="oops"' in second["max_length"]()


def test_field_builder_stops_adding_at_the_field_limit(app):
    data = builder_data(*({"name": f"f{i}"} for i in range(validation.MAX_SCHEMA_FIELDS)))
    with app.test_request_context(method="POST", data=data):
        form = forms.FieldsForm()
        assert forms.apply_builder_action(form, "add")
        assert len(form.fields) == validation.MAX_SCHEMA_FIELDS
        assert form.form_errors == ["A form can have at most 100 fields."]


def test_field_builder_shows_stored_specs(app):
    stored = [
        spec("email", type="email", required=True, max_length=200),
        spec("topic", type="select", choices=["Sales", "Support"], help="Pick one"),
    ]
    with app.test_request_context():
        form = forms.FieldsForm(data=forms.fields_form_data(stored))
        assert row_names(form) == ["email", "topic"]
        assert form.fields[1].form["choices"].data == "Sales\nSupport"
        assert form.validate(), form.errors
        assert forms.field_specs(form) == stored


@settings(max_examples=50, deadline=None)
@given(value=st.one_of(st.none(), st.sampled_from(["0", "1", "", "true", "yes", "on"]), st.text()))
def test_buttons_are_read_through_their_form_fields(tmp_path_factory, value):
    # The views read which button was pressed from these fields, never from request.form.
    app = _buttons_app(tmp_path_factory)
    data = {} if value is None else {"spam": value, "action": value}
    with app.test_request_context(method="POST", data=data):
        assert forms.SpamVerdictForm().spam.data is (value == "1")
        for form, default in (
            (forms.FieldsForm(), "save"),
            (forms.WebhookForm(), forms.WEBHOOK_SAVE),
            (forms.EraseForm(), forms.ERASE_COUNT),
        ):
            assert form.action.data == (default if value is None else value)


_BUTTONS_APP: list[Any] = []


def _buttons_app(tmp_path_factory):
    """One app (CSRF off) for every example of the property above."""
    if not _BUTTONS_APP:
        app = microapp.create_app(instance_path=str(tmp_path_factory.mktemp("buttons")))
        app.config["WTF_CSRF_ENABLED"] = False
        _BUTTONS_APP.append(app)
    return _BUTTONS_APP[0]


# =============================================================================
# Hosted form page
# =============================================================================


def test_empty_schema_hosts_the_default_form(app):
    with app.test_request_context():
        form = forms.hosted_form_class([])()
        assert [(f.name, f.type) for f in form] == [
            ("name", "StringField"),
            ("email", "EmailField"),
            ("message", "TextAreaField"),
        ]
        assert [s["name"] for s in validation.DEFAULT_FIELDS] == ["name", "email", "message"]
        assert "required" not in form["field_0"]()
        assert "required" in form["field_1"]()
        assert "required" in form["field_2"]()


@pytest.mark.parametrize(
    ("field", "fragments"),
    [
        (
            spec("t", label="Your name", max_length=80),
            ['type="text"', 'maxlength="80"', "Your name"],
        ),
        (spec("e", type="email", required=True), ['type="email"', "required", 'maxlength="254"']),
        (spec("u", type="url"), ['type="url"']),
        (spec("m", type="textarea", max_length=500), ["<textarea", 'maxlength="500"']),
        (
            spec("n", type="number", min=0, max=2.5),
            ['type="number"', 'min="0"', 'max="2.5"', 'step="any"'],
        ),
        (spec("d", type="date"), ['type="date"']),
        (
            spec("s", type="select", choices=["Red", "Blue"]),
            ["<select", '<option value="">', '<option value="Blue">'],
        ),
        (
            spec("r", type="radio", choices=["Yes", "No"], required=True),
            ['type="radio"', 'value="No"', "required"],
        ),
        (spec("c", type="checkbox", required=True), ['type="checkbox"', 'value="on"', "required"]),
    ],
)
def test_hosted_form_renders_each_field_type(app, field, fragments):
    with app.test_request_context():
        form = forms.hosted_form_class([field])()
        (bound,) = list(form)
        html = f"{bound.label()} {bound()}"
        assert f'name="{field["name"]}"' in html
        for fragment in fragments:
            assert fragment in html


def test_hosted_radio_list_is_not_marked_required(app):
    radio = spec("r", type="radio", choices=["Yes", "No"], required=True)
    with app.test_request_context():
        html = str(forms.hosted_form_class([radio])()["field_0"]())
    assert html.startswith('<ul id="r">')


def test_hosted_form_shows_help_text_and_keeps_posted_values(app):
    schema = [spec("age", type="number", help="In years"), spec("ok", type="checkbox")]
    with app.test_request_context(method="POST", data={"age": "abc", "ok": "on"}):
        form = forms.hosted_form_class(schema)()
        age, ok = list(form)
        assert age.description == "In years"
        assert 'value="abc"' in age()
        assert "checked" in ok()


def test_hosted_form_field_names_may_shadow_form_attributes(app):
    schema = [spec("data"), spec("errors"), spec("validate"), spec("on_submit", required=True)]
    with app.test_request_context(method="POST", data={"data": "1", "errors": "2"}):
        form = forms.hosted_form_class(schema)()
        assert [f.name for f in form] == ["data", "errors", "validate", "on_submit"]
        assert form.validate()
        assert isinstance(form.errors, dict)


def test_hosted_form_carries_a_csrf_token_when_csrf_is_on(app):
    app.config["WTF_CSRF_ENABLED"] = True
    with app.test_request_context():
        form = forms.hosted_form_class([])()
        assert "csrf_token" in form
        assert [f.name for f in form if f.name != "csrf_token"] == ["name", "email", "message"]


def test_attach_errors_puts_messages_on_fields_and_the_form(app):
    schema = [spec("email", type="email", required=True), spec("age", type="number")]
    data = {"age": "old", "nickname": "x"}
    with app.test_request_context(method="POST", data=data):
        form = forms.hosted_form_class(schema)()
        _, errors = validation.validate_submission(schema, data, strict=True)
        errors["_form"] = ["Too many fields: at most 100."]
        forms.attach_errors(form, errors)
        email, age = list(form)
        assert email.errors == ["This field is required."]
        assert age.errors == ["Enter a number."]
        assert form.form_errors == [
            "nickname: This form has no field with this name.",
            "Too many fields: at most 100.",
        ]
