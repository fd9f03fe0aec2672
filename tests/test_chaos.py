"""The chaos run (ops/bench/chaos.py): its checks on a made-up log, and its
short form, every fault kind once against real deployments."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from stratus.events.ids import new_id
from stratus.events.model import Cause
from stratus.events.resources import (
    QUOTA_DEFAULTS,
    QuotaSet,
    ServerDeleted,
    ServerRequested,
    ServerSpec,
)
from stratus.ops.bench.chaos import COUNTED, KINDS, LogFold, RunResult, Sent, command_checks


def request(cause: Cause, tenant: str, sid: str, vcpus: int = 1):
    return cause.make(
        ServerRequested,
        tenant,
        "server",
        sid,
        spec=ServerSpec(name=sid, image="base", vcpus=vcpus, ram_mb=64, disk_gb=0),
    )


def folded(*events) -> LogFold:
    fold = LogFold(QUOTA_DEFAULTS)
    for seq, e in enumerate(events, 1):
        fold.apply(seq, e)
    return fold


def test_the_checks_count_lost_duplicated_misreported_and_refused_but_applied():
    cmds = [Sent(new_id(), "server.create", {}) for _ in range(5)]
    c = [Cause(actor="admin", correlation_id=s.cid, causation_id=s.cid) for s in cmds]
    later = Cause(actor="agent", correlation_id=cmds[0].cid, causation_id=new_id())
    fold = folded(
        request(c[0], "acme", "s0"),  # 1: fine
        later.make(ServerDeleted, "acme", "server", "s0"),  # 2: caused by seq 1, not cmd 0
        request(c[1], "acme", "s1"),  # 3 and 5: applied twice
        request(c[3], "acme", "s3"),  # 4: refused, yet here
        request(c[1], "acme", "s1b"),
    )
    cmds[0].outcome, cmds[0].seqs = "acked", [1]
    cmds[1].outcome, cmds[1].seqs = "acked", [3]
    cmds[2].outcome, cmds[2].seqs = "acked", [9]  # nothing of it on the log
    cmds[3].outcome, cmds[3].error = "refused", "already_exists: s3"
    cmds[4].outcome, cmds[4].seqs = "acked", []  # acknowledged, appended nothing
    res = RunResult(run=1, kind="tree")
    command_checks(cmds, fold, res)
    assert (res.lost, res.duplicated, res.refused_applied) == (1, 1, 1)
    assert res.misreported == 1  # cmd 1: acked [3], its events [3, 5]
    assert cmds[2].cid in res.details["lost"][0]
    assert not res.ok


def test_quota_is_checked_at_every_sequence_against_the_limits_of_that_moment():
    admin = Cause(actor="admin", correlation_id=new_id(), causation_id=new_id())
    fold = folded(
        admin.make(QuotaSet, "acme", "quota", "acme", limits={"instances": 2}),
        request(admin, "acme", "a"),
        request(admin, "acme", "b"),
        request(admin, "acme", "c"),  # 3 of 2
        admin.make(ServerDeleted, "acme", "server", "c"),
        admin.make(ServerDeleted, "acme", "server", "b"),
        request(admin, "acme", "d"),  # 2 of 2 again
        request(admin, "globex", "g", vcpus=QUOTA_DEFAULTS["vcpus"] + 1),  # the default
    )
    assert fold.over_quota == [
        "acme instances 3 > 2 at seq 4",
        f"globex vcpus {QUOTA_DEFAULTS['vcpus'] + 1} > {QUOTA_DEFAULTS['vcpus']} at seq 8",
    ]
    assert fold.servers["c"].status == "deleted" and fold.servers["d"].status == "requested"


def test_a_report_after_server_deleted_is_recorded():
    admin = Cause(actor="admin", correlation_id=new_id(), causation_id=new_id())
    fold = folded(
        request(admin, "acme", "a"),
        admin.make(ServerDeleted, "acme", "server", "a"),
        request(admin, "acme", "a"),  # stands in for a late agent report
    )
    assert fold.servers["a"].status == "deleted"
    assert fold.servers["a"].after_delete == ["server.requested at 3"]


@pytest.mark.timeout(900)
def test_the_short_chaos_run_keeps_every_promise_under_each_fault():
    """One run per fault kind, a few dozen commands each, against real
    `stratus up` and `stratus serve` processes killed with SIGKILL (one
    deployment for all seven runs, each with tenants of its own)."""
    r = subprocess.run(
        [
            *(sys.executable, "-m", "stratus.ops.bench", "chaos"),
            *("--clients", "4", "--commands", "40", "--tenants", "3", "--settle", "30"),
            *("--shared", "--json"),
        ],
        capture_output=True,
        text=True,
        timeout=850,
    )
    assert r.stdout, r.stderr[-3000:]
    report = json.loads(r.stdout)
    runs = report["runs"]
    assert [run["kind"] for run in runs] == list(KINDS)
    bad = {
        run["kind"]: {
            **{k: run[k] for k in (*COUNTED, "digest_equal", "replica_equal", "error")},
            "details": run["details"],
        }
        for run in runs
        if not run["ok"]
    }
    assert not bad, json.dumps(bad, indent=1)
    for run in runs:
        assert run["acked"] > 0 and run["commands"] == 40
        # What it killed served again, and so did the control plane.
        assert run["restart_s"] is not None and run["recovery_s"] is not None
        assert "stop" not in run["details"]  # nothing left behind
    assert r.returncode == 0
