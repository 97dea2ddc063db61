"""tests/required_tests.py: under CI=true a skipped `required` test fails the run; elsewhere
it is a skip, and other tests' skips stay skips."""
import os
import subprocess
import sys
import textwrap

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))

_TESTS = textwrap.dedent('''
    import pytest

    @pytest.mark.required
    @pytest.mark.skipif(True, reason='libtpu hidden')
    def test_tpu_compile():
      pass

    @pytest.mark.required
    def test_two_processes():
      pytest.skip('gloo missing')

    def test_optional():
      pytest.skip('not needed')
    ''')


def run(tmp_path, ci):
  (tmp_path / 'conftest.py').write_text(
      'from required_tests import pytest_configure, pytest_runtest_makereport\n')
  (tmp_path / 'test_sample.py').write_text(_TESTS)
  env = dict(os.environ, PYTHONPATH=HERE + os.pathsep + os.environ.get('PYTHONPATH', ''))
  env.pop('CI', None)
  if ci is not None:
    env['CI'] = ci
  return subprocess.run([sys.executable, '-m', 'pytest', '-q', '-p', 'no:cacheprovider',
                         '-p', 'no:xdist', '-rA', str(tmp_path)], cwd=tmp_path, env=env,
                        capture_output=True, text=True, timeout=120, check=False)


@pytest.mark.parametrize('ci', ['true', '1'])
def test_required_skips_fail_under_ci(tmp_path, ci):
  proc = run(tmp_path, ci)
  assert proc.returncode != 0, proc.stdout
  assert 'required test skipped under CI=true' in proc.stdout and 'libtpu hidden' in proc.stdout
  assert 'gloo missing' in proc.stdout
  assert '1 skipped' in proc.stdout   # test_optional stays a skip


@pytest.mark.parametrize('ci', [None, 'false'])
def test_elsewhere_they_are_skips(tmp_path, ci):
  proc = run(tmp_path, ci)
  assert proc.returncode == 0, proc.stdout
  assert '3 skipped' in proc.stdout
