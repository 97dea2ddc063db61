"""Tests for data_prep/i2e/runs.py: Beam's portable PipelineResult, fed a message stream
that stays open after the job is DONE (as a loaded job service can leave it), is left
with no reader thread once `settle` returns."""
import threading

import grpc
import pytest
from apache_beam.portability.api import beam_job_api_pb2
from apache_beam.runners.portability import portable_runner

from data_prep.i2e import runs


class OpenStream:
  """A gRPC response stream that yields nothing until it ends, then fails the way grpc's
  does when cancelled (its reader raises an RpcError). It has no `cancel`."""

  def __init__(self):
    self._ended = threading.Event()

  def __iter__(self):
    return self

  def __next__(self):
    if not self._ended.wait(timeout=60):
      raise StopIteration  # never reached when settle works: keeps a failing test short
    raise grpc.RpcError('cancelled')

  def end(self):
    self._ended.set()


class CancellableStream(OpenStream):
  def cancel(self):
    self.end()


def readers():
  return [t for t in threading.enumerate() if t.name == runs.MESSAGE_READER and t.is_alive()]


def done_result(messages):
  done = beam_job_api_pb2.JobStateEvent(state=beam_job_api_pb2.JobState.DONE)
  return portable_runner.PipelineResult(None, 'job', messages, iter([done]))


@pytest.mark.filterwarnings('ignore::pytest.PytestUnhandledThreadExceptionWarning')
def test_settle_ends_the_message_reader_of_a_done_job():
  stream = CancellableStream()
  result = done_result(stream)
  assert result.wait_until_finish() == 'DONE'
  assert readers(), 'the reader should outlive the job here; the test would prove nothing'
  assert runs.settle(result, reader_wait_s=0.5)
  assert not readers()


@pytest.mark.filterwarnings('ignore::pytest.PytestUnhandledThreadExceptionWarning')
def test_settle_reports_a_reader_it_cannot_end():
  stream = OpenStream()
  result = done_result(stream)
  result.wait_until_finish()
  assert not runs.settle(result, reader_wait_s=0.2)
  stream.end()
  for t in readers():
    t.join(5)
  assert not readers()
