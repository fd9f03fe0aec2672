"""Sealed replies: only the client that asked can read the answer."""

from __future__ import annotations

import pytest

from stratus.events.errors import Internal
from stratus.events.sealed import H_SEALED, Opener, Sealer

INBOX = "_INBOX.abc.def"


def test_the_asking_client_opens_its_reply():
    service, client = Sealer(), Opener()
    sealed, headers = service.seal(client.public_b64, INBOX, b'{"ok":true,"data":"secret"}')
    assert b"secret" not in sealed
    assert client.open(headers[H_SEALED], INBOX, sealed) == b'{"ok":true,"data":"secret"}'


def test_another_client_cannot_open_it():
    service, client, sniffer = Sealer(), Opener(), Opener()
    sealed, headers = service.seal(client.public_b64, INBOX, b"token")
    with pytest.raises(Internal):
        sniffer.open(headers[H_SEALED], INBOX, sealed)


def test_a_reply_is_bound_to_its_inbox_and_tampering_shows():
    service, client = Sealer(), Opener()
    sealed, headers = service.seal(client.public_b64, INBOX, b"payload")
    with pytest.raises(Internal):
        client.open(headers[H_SEALED], "_INBOX.other", sealed)
    flipped = bytes([sealed[0] ^ 1]) + sealed[1:]
    with pytest.raises(Internal):
        client.open(headers[H_SEALED], INBOX, flipped)
    with pytest.raises(Internal):
        client.open("not-a-header", INBOX, sealed)


def test_each_reply_has_its_own_nonce_and_keys_are_cached():
    service, client = Sealer(), Opener()
    a, ha = service.seal(client.public_b64, INBOX, b"same")
    b, hb = service.seal(client.public_b64, INBOX, b"same")
    assert a != b and ha != hb
    opened = (client.open(ha[H_SEALED], INBOX, a), client.open(hb[H_SEALED], INBOX, b))
    assert opened == (b"same", b"same")


@pytest.mark.parametrize("key", ["", "AAAA", "!!!!", "A" * 200])
def test_a_malformed_client_key_is_refused(key):
    with pytest.raises(ValueError):
        Sealer().seal(key, INBOX, b"x")
