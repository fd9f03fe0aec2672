"""Which packages the wheel holds: found, not listed (the rest is in pyproject.toml).

The design card keeps the top-level folders at the repository root; they
install as one import namespace, ``stratus`` (``stratus.events`` is
``events/``, ...), so nothing named ``events`` or ``cli`` lands in
site-packages. setuptools' discovery cannot add that prefix by itself, so
it runs here: every folder with an ``__init__.py`` is a package, and a new
sub-package cannot be left out of the wheel. The tests are not shipped.
"""

from setuptools import find_packages, setup

found = find_packages(exclude=["tests", "tests.*"])
setup(
    packages=[f"stratus.{p}" for p in found],
    package_dir={f"stratus.{p}": p for p in found if "." not in p},
)
