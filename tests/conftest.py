"""Test setup: 8 simulated CPU devices, before JAX is imported anywhere."""
import os
import tempfile

os.environ.setdefault('JAX_PLATFORMS', 'cpu')
os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                           ' --xla_force_host_platform_device_count=8').strip()
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
# The user cache (mofi_jax/user_cache.py) of this test session, never the developer's own.
os.environ.setdefault('MOFI_JAX_CACHE', tempfile.mkdtemp(prefix='mofi_jax_cache-'))

import pytest  # pylint: disable=g-import-not-at-top,wrong-import-position
# Under CI=true a skip of a `required` test fails the run (tests/required_tests.py).
import required_tests  # pylint: disable=g-import-not-at-top,wrong-import-position
from required_tests import pytest_runtest_makereport  # pylint: disable=g-import-not-at-top,wrong-import-position,unused-import

# ~130 images of 20 entities: big enough for multi-entity and noisy records, built in < 1 s.
TINY_CORPUS_CONFIG = dict(seed=1, num_entities=20, images_per_entity=6, num_shards=4,
                          image_size=24, multi_entity_frac=0.3, retrieval_categories=5,
                          text_len=12, vocab_size=400)


# The longest test takes a few minutes on 2 loaded cores. One that hangs (a deadlock in a
# library, a lost subprocess) fails after this, with its stack, instead of stalling CI.
TEST_TIMEOUT_S = 1200


def pytest_configure(config):
  required_tests.pytest_configure(config)
  config.addinivalue_line('markers', 'longest: collected first, so that xdist starts it at '
                          'once and the other worker runs the rest beside it')


def pytest_collection_modifyitems(items):
  for item in items:
    if item.get_closest_marker('timeout') is None:
      item.add_marker(pytest.mark.timeout(TEST_TIMEOUT_S))
  items.sort(key=lambda item: item.get_closest_marker('longest') is None)  # stable


@pytest.fixture(scope='session')
def tiny_corpus(tmp_path_factory):
  """Path (str) of a tiny synthetic I2E corpus in the production format."""
  # Imported here so that test sessions that never use it do not pay for TensorFlow.
  from data_prep import demo_world  # pylint: disable=g-import-not-at-top
  return demo_world.ensure_corpus(tmp_path_factory.mktemp('data') / 'tiny_corpus',
                                      TINY_CORPUS_CONFIG)


@pytest.fixture(autouse=True)
def _no_mesh_leaks_between_tests():
  """Tests that call sharding.activate set a global mesh; clear it after."""
  yield
  import sys  # pylint: disable=g-import-not-at-top
  if 'jax' in sys.modules:
    import jax  # pylint: disable=g-import-not-at-top
    jax.set_mesh(None)
