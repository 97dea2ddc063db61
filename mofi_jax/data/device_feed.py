"""Train batches put on the devices ahead of the step that needs them.

`jax.device_put` (under `sharding.global_batch`) returns before the copy ends,
so holding `depth` batches on the devices overlaps the next batches' transfer
with the running step. The data iterator is checkpointed with the train state
and must stay in step with it, so the feed
  - never pulls a batch past a save boundary: the batch for boundary step s is
    the last one pulled until step s has run (and been saved);
  - on an unplanned stop (a preemption), `close()` stops pulling and the loop
    trains through the `pending` batches already on the devices before it
    saves: no batch is skipped, none is drawn twice.
"""
import collections


class DeviceFeed:
  """next() -> the device batch for the step after `first_step`, then the next..."""

  def __init__(self, host_iter, put, depth, is_boundary, first_step):
    if depth < 1:
      raise ValueError(f'config.input.device_prefetch={depth}; expected >= 1')
    self._host_iter, self._put = host_iter, put
    self._depth, self._is_boundary = depth, is_boundary
    self._queue = collections.deque()
    self._last_pulled = first_step   # the step the newest pulled batch is for
    self._open = True

  @property
  def pending(self):
    """Batches pulled from the data iterator that no step has consumed yet."""
    return len(self._queue)

  def close(self):
    """Pull nothing more; the pending batches are still served."""
    self._open = False

  def next(self):
    if not self._queue:
      if not self._open:
        raise RuntimeError('DeviceFeed.next after close() with nothing pending')
      self._pull()          # the previous boundary, if any, has been passed
    batch = self._queue.popleft()
    self._fill()
    return batch

  def _fill(self):
    while (self._open and len(self._queue) < self._depth
           and not self._is_boundary(self._last_pulled)):
      self._pull()

  def _pull(self):
    self._queue.append(self._put(next(self._host_iter)))
    self._last_pulled += 1
