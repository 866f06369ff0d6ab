"""Build script for tcprelay; the metadata lives in setup.cfg.

Only ``packages`` is computed here: with the flat layout, setuptools'
discovery would miss ``twisted.plugins`` (which must have no __init__.py, so
that it merges with Twisted's own plugin package) and would not exclude
``tests`` or ``benchmarks`` (the benchmark needs the Go sources under
tests/interop/ and runs from the checkout only).
"""

from setuptools import find_packages, setup

setup(
    packages=find_packages(include=["tcprelay", "tcprelay.*"]) + ["twisted.plugins"],
)
