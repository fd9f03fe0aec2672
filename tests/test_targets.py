"""Which addresses webhooks may reach (issue 17): the policy's table."""

from __future__ import annotations

import ipaddress

import pytest

from stratus.events.errors import Invalid
from stratus.handlers.targets import TargetPolicy, why_refused

# address -> the kind of refusal (None: a public address, reached)
CASES = {
    "127.0.0.1": "loopback",
    "127.255.0.9": "loopback",
    "::1": "loopback",
    "::ffff:127.0.0.1": "loopback",  # IPv4-mapped
    "2002:7f00:1::1": "loopback",  # 6to4 around 127.0.0.1
    "64:ff9b::a9fe:a9fe": "link-local",  # NAT64 around 169.254.169.254
    "169.254.169.254": "link-local",  # the metadata service of most clouds
    "fe80::1": "link-local",
    "10.1.2.3": "private",
    "172.16.0.1": "private",
    "192.168.0.1": "private",
    "fd00:ec2::254": "private",  # a metadata service over IPv6
    "100.100.100.200": "not globally routable",  # shared space (a metadata service)
    "192.0.2.10": "private",  # documentation: Python counts it private
    "224.0.0.251": "multicast",
    "233.252.0.1": "multicast",  # globally scoped multicast is still multicast
    "ff0e::1": "multicast",
    "0.0.0.0": "unspecified",
    "240.0.0.1": "private",  # reserved
    "8.8.8.8": None,
    "2606:4700:4700::1111": None,
    "::ffff:8.8.8.8": None,
}


@pytest.mark.parametrize("address,kind", CASES.items())
def test_the_refusal_names_the_kind_of_address(address: str, kind: str | None) -> None:
    why = why_refused(ipaddress.ip_address(address))
    assert (why is None) if kind is None else (why is not None and why.startswith(kind)), why


def test_an_allowed_network_lifts_the_refusal_for_it_alone() -> None:
    policy = TargetPolicy(["127.0.0.1/32", "fd00::/8"])
    assert policy.refusal(ipaddress.ip_address("127.0.0.1")) is None
    assert policy.refusal(ipaddress.ip_address("fd00:ec2::254")) is None
    assert "loopback" in (policy.refusal(ipaddress.ip_address("127.0.0.2")) or "")
    policy.check_url("http://127.0.0.1:8080/hook")
    with pytest.raises(Invalid, match="link-local"):
        policy.check_url("http://169.254.169.254/")


@pytest.mark.parametrize(
    "url",
    [
        "http://127.1/",  # what the C library reads as 127.0.0.1
        "http://0x7f000001/",
        "http://2130706433/",
        "http://LOCALHOST./",
        "http://app.localhost:8080/",
        "http://[fe80::1%25eth0]/",
    ],
)
def test_addresses_in_any_spelling_are_refused_when_created(url: str) -> None:
    with pytest.raises(Invalid):
        TargetPolicy().check_url(url)


def test_names_are_left_to_delivery_and_bad_networks_are_refused() -> None:
    TargetPolicy().check_url("https://cmdb.example/hook")  # no DNS in the command path
    with pytest.raises(Invalid, match="allowed webhook network"):
        TargetPolicy(["10.0.0.0/33"])
