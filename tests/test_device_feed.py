"""mofi_jax/data/device_feed.py: batches in order, never pulled past a save
boundary, and after close() only what was pulled is served."""
import pytest

from mofi_jax.data import device_feed


class CountingIterator:
  def __init__(self):
    self.pulled = 0

  def __next__(self):
    self.pulled += 1
    return self.pulled      # the batch for step `pulled` (counting from 1)


def make(depth=2, every=5, first_step=0):
  host = CountingIterator()
  host.pulled = first_step
  feed = device_feed.DeviceFeed(host, lambda b: ('on-device', b), depth,
                                is_boundary=lambda s: s % every == 0, first_step=first_step)
  return host, feed


@pytest.mark.parametrize('depth, first_step', [(1, 0), (2, 0), (3, 5), (2, 7)])
def test_batches_in_order_and_never_past_a_save_boundary(depth, first_step):
  host, feed = make(depth, first_step=first_step)
  for step in range(first_step + 1, first_step + 23):
    assert feed.next() == ('on-device', step)
    # At most `depth` ahead of the running step, and never beyond the next
    # boundary: at a save after `step`, the iterator has given exactly `step`.
    next_boundary = -(-step // 5) * 5
    assert step <= host.pulled <= min(step + depth, next_boundary)
    if step % 5 == 0:
      assert host.pulled == step and feed.pending == 0


def test_look_ahead_fills_to_depth_between_boundaries():
  host, feed = make(depth=2, every=100)
  feed.next()
  assert host.pulled == 3 and feed.pending == 2


def test_close_serves_what_is_pending_then_stops():
  host, feed = make(depth=2, every=100)
  feed.next(); feed.next()
  feed.close()
  pending, pulled = feed.pending, host.pulled
  assert pending == 2
  assert [feed.next() for _ in range(pending)] == [('on-device', 3), ('on-device', 4)]
  assert host.pulled == pulled and feed.pending == 0
  with pytest.raises(RuntimeError, match='after close'):
    feed.next()


def test_depth_must_be_positive():
  with pytest.raises(ValueError, match=r'config.input.device_prefetch=0; expected >= 1'):
    make(depth=0)
