"""The auth callout's reading of a server's authorization request expiry.

nats-server sets ``exp`` to the request's time plus its auth timeout,
truncated to whole seconds, and waits for the answer until the untruncated
time: the callout answers up to ``AUTH_REQUEST_LEEWAY_S`` after ``exp``
and no later. Other JWTs keep their expiry exact.
"""

from __future__ import annotations

import pytest

from stratus.events import natsjwt
from stratus.events.natsjwt import AUTH_REQUEST_LEEWAY_S, Expired, Signer, new_seed


def request(server: Signer, exp: int) -> str:
    claims = {
        "exp": exp,
        "sub": natsjwt.Signer(new_seed("account")).public,
        "nats": {
            "server_id": {"id": server.public, "name": "n1"},
            "user_nkey": Signer(new_seed("user")).public,
            "type": "authorization_request",
            "version": 2,
        },
    }
    return natsjwt.encode(claims, server, now=exp - 2)


@pytest.mark.parametrize(
    ("after_exp", "answered"),
    [
        (-1.0, True),  # well within the server's wait
        (0.5, True),  # past the truncated exp, within the server's deadline
        (AUTH_REQUEST_LEEWAY_S - 0.01, True),
        (AUTH_REQUEST_LEEWAY_S + 0.01, False),  # the server has given up
        (5.0, False),
    ],
)
def test_an_authorization_request_is_answered_until_the_servers_deadline(after_exp, answered):
    server = Signer(new_seed("server"))
    exp = 2_000_000_000
    token = request(server, exp)
    if answered:
        assert natsjwt.auth_request(token, now=exp + after_exp).server_id.id == server.public
    else:
        with pytest.raises(Expired):
            natsjwt.auth_request(token, now=exp + after_exp)


def test_other_jwts_expire_at_their_exp():
    account = Signer(new_seed("account"))
    token = natsjwt.encode({"exp": 2_000_000_000, "sub": "x"}, account, now=1_999_999_000)
    natsjwt.decode(token, issuer_role="account", now=2_000_000_000)
    with pytest.raises(Expired):
        natsjwt.decode(token, issuer_role="account", now=2_000_000_000.5)
