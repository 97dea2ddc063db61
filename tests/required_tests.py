"""A CI run may not skip what it exists to check (loaded by conftest.py).

Tests marked `required` (the TPU compiles, the 2-process run) skip on a machine that cannot
run them: a laptop without libtpu, a jaxlib without gloo. Under CI=true such a skip is a
failure, so CI cannot go green on a machine where libtpu fails to load or gloo is missing.
"""
import os

import pytest


def pytest_configure(config):
  config.addinivalue_line('markers', 'required: under CI=true, a skip of this test fails the '
                          'run')


def in_ci():
  return os.environ.get('CI', '').strip().lower() in ('1', 'true', 'yes')


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
  del call
  outcome = yield
  report = outcome.get_result()
  if report.skipped and in_ci() and item.get_closest_marker('required') is not None:
    reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else report.longrepr
    report.outcome = 'failed'
    report.longrepr = f'required test skipped under CI=true: {reason}'
