"""mofi_jax/telemetry.py: metrics.jsonl across a resume, and the throughput arithmetic on a
clock the test drives (the real run's figures: test_train.py)."""
import json
import types

import jax
import pytest

from mofi_jax import telemetry, tpu_specs


def read(path):
  with open(path) as f:
    return [json.loads(line) for line in f]


def test_jsonl_resume_drops_the_interrupted_runs_later_lines(tmp_path):
  writer = telemetry.JsonlWriter(str(tmp_path))
  for step in (5, 10, 15):
    writer.write_scalars(step, {'train/loss': step / 10, 'b': step})
  writer.close()
  with open(tmp_path / telemetry.METRICS_FILE, 'a') as f:
    f.write('{"step": 20, "train/lo')   # killed mid-line
  writer = telemetry.JsonlWriter(str(tmp_path), first_step=10)
  writer.write_scalars(15, {'train/loss': 1.25})
  writer.close()
  assert read(tmp_path / telemetry.METRICS_FILE) == [
      {'step': 5, 'b': 5.0, 'train/loss': 0.5}, {'step': 10, 'b': 10.0, 'train/loss': 1.0},
      {'step': 15, 'train/loss': 1.25}]


def fake_config(batch):
  return types.SimpleNamespace(input=types.SimpleNamespace(batch_size=batch), get=lambda k, d: {
      'peak_flops_per_chip': 0.0} if k == 'log' else d)


def test_throughput_by_hand(monkeypatch):
  clock = [100.0]
  monkeypatch.setattr(telemetry.time, 'perf_counter', lambda: clock[0])
  monkeypatch.setattr(telemetry.step_analysis, 'model_flops', lambda config: 6e12)
  devices = [types.SimpleNamespace(platform='tpu', device_kind='TPU v5 lite')] * 4
  meter = telemetry.Throughput(fake_config(64), devices, first_step=10)
  with meter.waiting_for_input():
    clock[0] += 0.5
  clock[0] += 1.5
  got = meter.report(20)   # 10 steps of 64 images in 2 s on 4 chips, 0.5 s waiting
  assert got == pytest.approx({
      'perf/images_per_s': 320.0, 'perf/images_per_s_per_chip': 80.0,
      'perf/tflops_per_chip': 6 * 10 / 2 / 4, 'perf/input_wait_share': 0.25,
      'perf/mfu': 7.5e12 / tpu_specs.CHIPS['v5e'].peak_bf16_flops,
      'perf/peak_tflops_per_chip': tpu_specs.CHIPS['v5e'].peak_bf16_flops / 1e12})
  clock[0] += 3.0
  meter.restart(25)          # an eval's 3 s are not the steps'
  clock[0] += 1.0
  later = meter.report(30)
  assert later['perf/images_per_s'] == pytest.approx(320.0)
  assert 'perf/peak_tflops_per_chip' not in later   # logged once


@pytest.mark.parametrize('platform, kind, configured, peak', [
    ('tpu', 'TPU v4', 0, tpu_specs.CHIPS['v4'].peak_bf16_flops),
    ('tpu', 'TPU v5', 0, tpu_specs.CHIPS['v5p'].peak_bf16_flops),
    ('tpu', 'TPU v6 lite', 0, tpu_specs.CHIPS['v6e'].peak_bf16_flops),
    ('cpu', 'cpu', 0, 'measured'),
    ('gpu', 'NVIDIA H100 80GB HBM3', 0, 'measured'),
    ('gpu', 'NVIDIA H100 80GB HBM3', 7.5e14, 7.5e14),
    ('tpu', 'TPU v5 lite', -1, None),
    ('cpu', 'cpu', -1, None)])
def test_chip_peak(platform, kind, configured, peak):
  devices = [types.SimpleNamespace(platform=platform, device_kind=kind)]
  measured = []
  got = telemetry.chip_peak_flops(devices, configured,
                                  measure=lambda d: measured.append(d) or 1.25e11)
  assert got == (1.25e11 if peak == 'measured' else peak)
  assert measured == ([devices[0]] if peak == 'measured' else [])
  if peak == 'measured':   # nothing to measure with: no peak, no MFU
    assert telemetry.chip_peak_flops(devices, configured) is None


def test_measured_matmul_rate_is_2n3_over_the_best_time():
  """A real n x n matmul on the CPU, timed by a clock the test controls: 2 n^3 FLOPs over the
  fastest of the timed repetitions (not the mean, not the compile)."""
  # (start, end) of each repetition: 0.5, 0.2, 0.4, 0.3 and 0.25 s.
  ticks = iter([0.0, 0.5, 10.0, 10.2, 20.0, 20.4, 30.0, 30.3, 40.0, 40.25])
  n = 64
  got = telemetry.measured_matmul_flops(jax.devices()[0], 'float32', n=n, reps=5,
                                        clock=lambda: next(ticks))
  assert got == pytest.approx(2 * n ** 3 / 0.2)
