"""`--at` and `stratus projections rebuild` as a user runs them, against `stratus up`."""

from __future__ import annotations

import json
import time
from datetime import datetime, timedelta

import pytest

from .test_cli import cli, login, up, wait_projected  # noqa: F401 (fixture)

pytestmark = pytest.mark.timeout(180)


def ok(r) -> dict | list:
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def test_at_shows_the_earlier_world_and_a_rebuild_swaps_in_the_same_one(up):  # noqa: F811
    url = up.start()
    login(url)
    ok(cli(url, "tenant", "create", "globex", "-o", "json"))
    created = wait_projected(url)["last_seq"]
    ok(cli(url, "tenant", "rename", "globex", "globex-eu", "-o", "json"))
    time.sleep(1.0)  # a moment between the rename and the next event
    ok(cli(url, "tenant", "create", "acme", "-o", "json"))
    now = wait_projected(url)

    # the tenant renamed later shows its old name --at the point before
    then = ok(cli(url, "tenant", "list", "--at", str(created), "-o", "json"))
    assert [(t["id"], t["name"]) for t in then] == [("admin", "admin"), ("globex", "globex")]
    shown = ok(cli(url, "tenant", "show", "globex", "--at", str(created), "-o", "json"))
    assert shown["name"] == "globex"
    assert ok(cli(url, "tenant", "show", "globex", "-o", "json"))["name"] == "globex-eu"
    past = ok(cli(url, "status", "--at", str(created), "-o", "json"))
    assert past["at"] == created and past["projection_digest"] != now["projection_digest"]
    # at a time: shortly after the rename (a time is matched against when
    # events were stored, a little after the `at` their handler stamped)
    tail = [
        json.loads(x)
        for x in cli(
            url, "events", "tail", "--at", str(created + 1), "-o", "json"
        ).stdout.splitlines()
    ]
    assert tail[-1]["seq"] == created + 1 and tail[-1]["type"] == "tenant.renamed"
    renamed_at = datetime.fromisoformat(tail[-1]["at"]) + timedelta(seconds=0.5)
    at_time = ok(cli(url, "tenant", "list", "--at", renamed_at.isoformat(), "-o", "json"))
    assert {t["name"] for t in at_time} == {"admin", "globex-eu"}
    for args in (("user", "list"), ("role", "list"), ("audit",)):
        ok(cli(url, *args, "--at", str(created), "-o", "json"))

    # bad points are refused with exit 1 and a reason
    for bad, words in (("soon", "not a sequence number"), (str(now["last_seq"] + 5), "beyond")):
        r = cli(url, "tenant", "list", "--at", bad)
        assert r.returncode == 1 and r.stderr.startswith("error: invalid:") and words in r.stderr

    # a rebuild replays everything and swaps in a store with the live digest
    r = cli(url, "projections", "rebuild", "--data-dir", str(up.data_dir), "-o", "json")
    rebuilt = ok(r)
    assert {"digest", "events", "seconds"} <= rebuilt.keys()
    assert rebuilt["events"] == now["last_seq"] and rebuilt["seconds"] > 0
    status = wait_projected(url)
    assert status["last_seq"] == now["last_seq"]
    assert rebuilt["digest"] == status["projection_digest"] == now["projection_digest"]
    assert (up.data_dir / "projections.current").read_text().strip() == rebuilt["store"]
    assert not (up.data_dir / "projections.db").exists()

    # and a restart opens the swapped-in store
    up.stop()
    url = up.start()
    again = wait_projected(url)
    assert again["projection_digest"] == now["projection_digest"]
    assert not (up.data_dir / "projections.db").exists()
