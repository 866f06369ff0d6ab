"""
Examples of :mod:`tcprelay.testing` as another project would use it: one
pytest(-twisted) test module and one Trial module (``trial_example.py``,
named so that pytest does not collect it; ``tests/test_testing_kit.py``
runs it with ``python -m twisted.trial``).
"""
