"""The identity benchmark: token verification and password hashing on one core.

``python -m stratus.ops.bench identity [--json]``

Every command and query carries a bearer token, so verification sits on the
hot path of every request. The issue's target is 20,000 verifications a
second on one core. Rows, all measured in this one run on the same keys and
tokens, pinned to one CPU:

* Ed25519 alone (``cryptography``): the signature check with no JWT parsing,
  the floor for any verification that checks a signature.
* PyJWT decode: what an integration pays with an ordinary JWT library; the
  baseline the Stratus rows are compared with.
* Verifier, cold: every token distinct, so every call checks a signature.
* Verifier, warm: a realistic mix, a thousand sessions each sending many
  requests in random order, so most calls are cache hits (first uses are
  misses and are counted). Revocation lookups run against a populated set.
* scrypt hash and verify of a password (sign-in and user creation).

Ops are timed one by one (``perf_counter`` around each call, ~0.1 µs),
which the rates include.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import random
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from stratus.handlers import passwords
from stratus.handlers.keyring import KeyRing
from stratus.handlers.passwords import hash_password, verify_password
from stratus.handlers.tokens import Verifier
from stratus.ops.bench.common import Load, Report, Result, compare, positive, print_table, result

TARGET_PER_S = 20_000


@dataclass
class Options:
    # Distinct tokens for the cold rows (each verified once per row).
    cold_tokens: int = 20_000
    # Warm mix: this many sessions (distinct tokens), each used this often.
    warm_tokens: int = 1_000
    warm_uses: int = 200
    # Revoked token ids and disabled users the warm verifier holds.
    revoked_tokens: int = 10_000
    revoked_users: int = 1_000
    password_hashes: int = 20
    # No row starts new work after this long; it reports what it did.
    phase_seconds: float = 8.0
    seed: int = 7


@contextlib.contextmanager
def one_core() -> Iterator[int | None]:
    """Pin this process to one CPU for the run, so "on one core" is literal."""
    getter = getattr(os, "sched_getaffinity", None)
    setter = getattr(os, "sched_setaffinity", None)
    if getter is None or setter is None:
        yield None
        return
    before = getter(0)
    cpu = max(before)
    try:
        setter(0, {cpu})
    except OSError:
        yield None
        return
    try:
        yield cpu
    finally:
        with contextlib.suppress(OSError):
            setter(0, before)


def timed(op: Callable[[Any], object], items: Sequence[Any], max_seconds: float) -> Load:
    """Call ``op`` on each item in turn, timing each; stop early after ``max_seconds``."""
    load = Load()
    lat = load.latencies
    clock = time.perf_counter
    start = clock()
    deadline = start + max_seconds
    for item in items:
        t0 = clock()
        if t0 >= deadline:
            break
        try:
            op(item)
        except Exception as exc:
            load.errors += 1
            if load.first_error is None:
                load.first_error = f"{type(exc).__name__}: {exc}"
            continue
        lat.append(clock() - t0)
    load.done = len(lat)
    load.seconds = clock() - start
    return load


def run(opts: Options) -> Report:
    """Make a key ring in a temp dir, measure every row, clean up."""
    report = Report("identity", opts)
    tmp = Path(tempfile.mkdtemp(prefix="stratus-bench-identity-"))
    try:
        with one_core() as cpu:
            report.info.update(
                {
                    "pinned_cpu": cpu,
                    "cpus": os.cpu_count(),
                    "python": platform.python_version(),
                    "pyjwt": jwt.__version__,
                    "started": datetime.now(UTC).isoformat(timespec="seconds"),
                }
            )
            _run(tmp, opts, report)
    except Exception as exc:
        report.failures.append(f"identity: {type(exc).__name__}: {exc}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return report


def _run(tmp: Path, opts: Options, report: Report) -> None:
    rng = random.Random(opts.seed)
    ring = KeyRing.load_or_create(tmp / "keys")
    kid = ring.signing_kid
    raw = ring.public_keys()[kid]
    public = Ed25519PublicKey.from_public_bytes(raw)
    now = time.time()

    start = time.perf_counter()
    roles = (["member"], ["reader"], ["member", "reader"], ["admin"])
    cold = [
        ring.sign(f"user{i}", f"tenant{i % 50}", rng.choice(roles), now=now)[0]
        for i in range(opts.cold_tokens)
    ]
    report.info["token_bytes"] = len(cold[0])
    report.info["signing_us"] = round((time.perf_counter() - start) / len(cold) * 1e6, 1)
    limit = opts.phase_seconds

    # Floor: the Ed25519 check alone over each token's signing input.
    def ed25519(token: str) -> None:
        head, _, sig = token.rpartition(".")
        public.verify(jwt.utils.base64url_decode(sig), head.encode("ascii"))

    # Untimed warm-up: the first row must not pay for a cold CPU and caches.
    timed(ed25519, cold[:2_000], 1.0)
    floor = result("Ed25519 verify alone (cryptography)", timed(ed25519, cold, limit))
    floor.note = "signature only, no parsing: the ceiling for any cold check"

    # Baseline: an ordinary JWT library, as an integration would verify.
    def pyjwt(token: str) -> None:
        jwt.decode(token, public, algorithms=["EdDSA"])

    base = result("PyJWT decode (baseline)", timed(pyjwt, cold, limit))

    target = Result(f"{TARGET_PER_S:,}/s", TARGET_PER_S, 1.0)

    cold_verifier = Verifier({kid: raw})
    cold_row = result(
        "Verifier, cold: every token distinct",
        timed(lambda t: cold_verifier.verify(t, now=now), cold, limit),
    )
    compare(cold_row, target, 1.0, label=f"{TARGET_PER_S:,}/s")
    cold_row.note = f"{_vs(cold_row, base)}; {_us(cold_row)}; bounded by the Ed25519 row"

    warm_verifier = Verifier({kid: raw})
    for i in range(opts.revoked_tokens):
        warm_verifier.revoke_token(f"revoked-{i}", int(now) + 3600)
    for i in range(opts.revoked_users):
        warm_verifier.revoke_user(f"disabled{i}", now - 3600)
    sessions = [
        ring.sign(f"user{i}", f"tenant{i % 50}", rng.choice(roles), now=now)[0]
        for i in range(opts.warm_tokens)
    ]
    mix = sessions * opts.warm_uses
    rng.shuffle(mix)
    warm_row = result(
        f"Verifier, warm: {opts.warm_tokens:,} tokens x {opts.warm_uses} uses",
        timed(lambda t: warm_verifier.verify(t, now=now), mix, limit),
    )
    compare(warm_row, target, 1.0, label=f"{TARGET_PER_S:,}/s")
    hit_share = 1 - opts.warm_tokens / max(1, warm_row.count)
    warm_row.note = (
        f"{_vs(warm_row, base)}; {_us(warm_row)}; {hit_share:.1%} cache hits; "
        f"{opts.revoked_tokens:,} revoked ids, {opts.revoked_users:,} disabled users"
    )

    secrets = [f"correct horse battery staple {i}" for i in range(opts.password_hashes)]
    hashing = timed(hash_password, secrets, limit)
    hash_row = result(
        f"password hash (scrypt n={passwords.N}, r={passwords.R}, p={passwords.P})", hashing
    )
    stored = hash_password(secrets[0])
    check_row = result(
        "password verify",
        timed(lambda s: verify_password(s, stored), [secrets[0]] * opts.password_hashes, limit),
    )
    report.info["password_hash_ms"] = round(hashing.seconds / max(1, hashing.done) * 1000, 1)

    report.results += [floor, base, cold_row, warm_row, hash_row, check_row]
    for r in report.results:
        if r.errors:
            report.failures.append(f"{r.name}: {r.errors} errors ({r.note})")


def _us(r: Result) -> str:
    """Sub-millisecond latencies, which the table's two ms decimals round away."""
    if r.p50_ms is None or r.p99_ms is None:
        return "no latencies"
    return f"p50 {r.p50_ms * 1000:.1f} us, p99 {r.p99_ms * 1000:.1f} us"


def _vs(r: Result, base: Result) -> str:
    return f"{r.rate / base.rate:.2f}x PyJWT decode" if base.rate else "no baseline"


def print_report(report: Report, wall: float | None = None) -> None:
    info = report.info
    cpu = info.get("pinned_cpu")
    where = f"pinned to CPU {cpu}" if cpu is not None else "not pinned (no sched_setaffinity)"
    caption = (
        f"One Python thread {where} of {info.get('cpus')}; Python {info.get('python')}, "
        f"PyJWT {info.get('pyjwt')}; tokens {info.get('token_bytes')} bytes, signing "
        f"{info.get('signing_us')} us each (not timed). Target: {TARGET_PER_S:,} "
        f"verifications/s on one core; rates include ~0.1 us of per-call timing."
    )
    if wall is not None:
        caption += f" Wall time {wall:.1f} s."
    print_table("Stratus identity benchmark", report.results, caption)
    for row in report.results:
        if row.met is not None:
            verdict = "meets" if row.met else "does NOT meet"
            print(f"{row.name}: {row.rate:,.0f}/s {verdict} the {TARGET_PER_S:,}/s target")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    d = Options()
    p = argparse.ArgumentParser(
        prog="python -m stratus.ops.bench identity",
        description="Token verification and password hashing on one core.",
    )
    p.add_argument("--cold-tokens", type=positive, default=d.cold_tokens)
    p.add_argument("--warm-tokens", type=positive, default=d.warm_tokens)
    p.add_argument("--warm-uses", type=positive, default=d.warm_uses)
    p.add_argument("--password-hashes", type=positive, default=d.password_hashes)
    p.add_argument(
        "--phase-seconds",
        type=float,
        default=d.phase_seconds,
        help="no row starts new work after this long",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object, no table")
    p.add_argument("--strict", action="store_true", help="exit 2 when a target is missed")
    return p.parse_args(argv)


def options_from(args: argparse.Namespace) -> Options:
    return Options(
        cold_tokens=args.cold_tokens,
        warm_tokens=args.warm_tokens,
        warm_uses=args.warm_uses,
        password_hashes=args.password_hashes,
        phase_seconds=args.phase_seconds,
    )


def exit_status(report: Report, strict: bool) -> int:
    if report.failures:
        return 1
    if strict and any(r.met is False for r in report.results):
        return 2
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run the identity benchmark; 0 ok, 1 a row failed, 2 (``--strict``) a target missed."""
    args = parse_args(argv)
    start = time.perf_counter()
    report = run(options_from(args))
    wall = time.perf_counter() - start
    report.info["wall_seconds"] = round(wall, 1)
    if args.json:
        print(json.dumps({"identity": report.to_json()}, indent=2))
    else:
        print_report(report, wall)
        for f in report.failures:
            print(f"FAILED: {f}", file=sys.stderr)
    return exit_status(report, args.strict)


if __name__ == "__main__":
    sys.exit(main())
