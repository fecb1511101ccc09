"""
What root quotes of the user's side hides a deployment's secrets however it
was quoted: as written, as JSON, in a URL, and as Python quotes it in either
quotes (an error message's repr of an answer escapes what the secret holds).
"""

import json
import urllib.parse

import pytest

from localfleet.config import saltfleet_utils

scrub = saltfleet_utils().saltfleet_user.scrub
SECRETS = {"A": "pw'4f\\9a c2", "B": "sk_live_4f9a0c2e71b84d5e9c3a6f1b", "C": "é-ü-中-tok"}


@pytest.mark.parametrize("name", sorted(SECRETS))
@pytest.mark.parametrize(
    "quote",
    [
        lambda v: v,
        repr,
        lambda v: repr(f"'{v}\""),  # both quotes around it: Python escapes the single ones
        lambda v: json.dumps({"said": v}),
        lambda v: urllib.parse.quote(v, safe=""),
    ],
    ids=["as written", "repr", "repr in both quotes", "JSON", "URL"],
)
def test_a_secret_is_hidden_however_python_json_or_a_url_quote_it(name, quote):
    text = f"supervisord answered {quote(SECRETS[name])}, which it never gives"
    hidden = scrub(text, SECRETS)
    assert f"<env:{name}>" in hidden, hidden
    assert quote(SECRETS[name]) not in hidden


@pytest.mark.parametrize(
    "answer",
    [
        lambda v: {"statename": 'say "' + v},  # the repr escapes the quote and the tab in it
        lambda v: ["x" * 5000 + v + "y" * 5000],  # cut short, after hiding
        lambda v: "HTTP/1.0 500 " + v,
    ],
    ids=["escaped in a record", "in the middle of a long list", "as text"],
)
def test_an_answer_quoted_in_an_error_hides_the_secrets_of_its_block_before_it_is_escaped_or_cut(answer):
    utils = saltfleet_utils()
    secret = "pw'ab\tcdef-4f9a0c2e"
    with utils.saltfleet_user.hiding({"K": secret}):
        quoted = utils.saltfleet_xmlrpc.said(answer(secret), most=20000)
        cut = utils.saltfleet_xmlrpc.said(answer(secret))
    pieces = {secret[i : i + 6] for i in range(len(secret) - 5)}
    assert "<env:K>" in quoted and not any(piece in quoted for piece in pieces), quoted
    assert len(cut) <= 200 and not any(piece in cut for piece in pieces), cut
