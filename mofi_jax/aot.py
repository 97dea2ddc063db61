r"""Compiles the real training step for a TPU slice on a CPU host (no TPU
attached) and says whether it fits, how long a step should take, and the MFU.

  python -m mofi_jax.aot --config configs/mofi_h14.py:multitask --topology v5e:16x16
  python -m mofi_jax.aot --config configs/mofi.py:ViT-B-16 --topology v4-128 \
      --config.input.batch_size=16384 --config.model.remat=dots --json /tmp/b16.json

Overrides are spelt as train's, `--config.key=value` (`--set key=value` is the same), and
type-checked against the config. Needs libtpu: pip install -e ".[tpu]". No corpus is read:
head.num_classes and text.vocab_size come from the config (give them with --config.KEY=N
where it says -1).
Exit status: 0 fits with --min_headroom to spare; 1 does not; 2 bad input.
"""
import dataclasses
import json
import os
import sys
import time

# Compile-only: the TPU devices are described by libtpu and never attached, so
# JAX itself runs on the CPU (set before JAX is imported).
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

# pylint: disable=g-import-not-at-top,wrong-import-position
import jax
from absl import app, flags

from mofi_jax import (cli_errors, config_files, run_setup, sharding, step_analysis,
                      tpu_specs)
from mofi_jax.models import layers, mofi

FLAGS = flags.FLAGS
flags.DEFINE_string('config', None, 'Config file[:variant], e.g. '
                    'configs/mofi_h14.py:multitask.')
flags.DEFINE_string('topology', None, 'TPU slice: v5e:16x16, v4:4x4x4, '
                    'v5p:4x4x8, v6e:16x16, or a slice name such as v5e-256.')
flags.DEFINE_multi_string('set', [], 'key=value config override, type-checked '
                          'against the config (repeatable); --config.key=value is the same.')
OVERRIDE_PREFIX = '--config.'   # train's spelling (ml_collections' config_flags)
flags.DEFINE_string('json', None, 'Write the report here as JSON.')
flags.DEFINE_float('min_headroom', 0.10, 'Fraction of HBM that must stay free.')
flags.DEFINE_bool('cost', True, 'Also compile shallow unrolled variants for '
                  'FLOPs, bytes, step time and MFU (3 more compiles).')


class AotError(ValueError):
  pass


# ------------------------------------------------------------------ config
def check_complete(config):
  """Sizes that train.py takes from the corpus must be given here."""
  try:
    run_setup.validate_config(config)
  except run_setup.ConfigError as e:
    raise AotError(str(e)) from e
  if config.model.remat not in layers.REMAT_POLICIES:
    raise AotError(f'config.model.remat={config.model.remat!r}; expected one of '
                   f'{sorted(layers.REMAT_POLICIES)}')
  needed = []
  if mofi.uses_head(config.model.mode):
    needed.append('model.head.num_classes')
  if mofi.uses_text(config.model.mode):
    needed.append('model.text.vocab_size')
  for key in needed:
    node = config
    for part in key.split('.'):
      node = node[part]
    if node == -1:
      raise AotError(f'config.{key} is -1 (train.py reads it from the corpus); '
                     f'give it with --config.{key}=N')


# ---------------------------------------------------------------- analysis
def analyse(config, topology, min_headroom=0.10, with_cost=True, label=''):
  """The report (a dict) for `config` on `topology`."""
  devices = tpu_specs.devices(topology)
  mesh = sharding.make_mesh(config.mesh, devices)
  sharding.check_batch_divides(config.input.batch_size, mesh,
                              microbatches=config.optim.microbatches)
  report = dict(
      config=label,
      topology=dict(name=topology.libtpu_name, slice=topology.slice_name,
                    chips=topology.num_chips,
                    hosts=len({d.process_index for d in devices})),
      chip=dataclasses.asdict(topology.chip), mesh=dict(mesh.shape),
      global_batch=config.input.batch_size,
      per_chip_batch=config.input.batch_size // topology.num_chips,
      model=dict(mode=config.model.mode, image=config.model.image.get('variant'),
                 remat=config.model.remat, scan=config.model.scan,
                 dtype=config.model.dtype, head_dtype=config.loss.head_dtype,
                 tile_size=config.loss.tile_size,
                 num_classes=config.model.head.num_classes),
      hbm_bytes=topology.chip.hbm_bytes, min_headroom=min_headroom,
      jax_version=jax.__version__)
  t = time.perf_counter()
  compiled, oom = step_analysis.compile_or_oom(
      step_analysis.lower_train_step(config, mesh))
  report['compile_s'] = time.perf_counter() - t
  if oom:
    report.update(fits=False, out_of_memory=dataclasses.asdict(oom))
    return report
  memory = step_analysis.Memory.of(compiled)
  headroom = 1 - memory.total / topology.chip.hbm_bytes
  report.update(memory=dict(dataclasses.asdict(memory), total=memory.total),
                headroom=headroom, fits=headroom >= min_headroom)
  # The cost compiles take longer than the one above: only for a step that fits.
  if with_cost and report['fits']:
    report.update(_cost_report(config, mesh, topology, devices, report['topology']['hosts']))
  return report


def _cost_report(config, mesh, topology, devices, hosts):
  t = time.perf_counter()
  cost = step_analysis.step_cost(config, mesh,
                                 links=step_analysis.IciModel.of(devices, topology))
  chip = topology.chip
  step = step_analysis.StepTime.roofline(cost, chip.peak_bf16_flops,
                                         chip.hbm_bytes_per_s)
  model_flops = step_analysis.model_flops(config)
  mfu = lambda seconds: model_flops / topology.num_chips / (seconds * chip.peak_bf16_flops)
  images_per_s = config.input.batch_size / step.seconds
  return dict(
      cost=dict(flops=cost.flops, bytes=cost.bytes, collective_bytes_sent=cost.sent,
                method='depth-1/2 unrolled compiles, extrapolated per layer'),
      cost_compile_s=time.perf_counter() - t,
      step_time=dataclasses.asdict(step), model_flops=model_flops,
      mfu=mfu(step.seconds), mfu_serial=mfu(step.serial_s),
      images_per_s=images_per_s, images_per_s_per_host=images_per_s / hosts)


def _gib(n):
  return f'{n / 2 ** 30:.2f} GiB'


def format_report(r):
  topo = r['topology']
  lines = [
      f'{r["config"]} on {topo["slice"]} ({topo["name"]}, {topo["chips"]} chips, '
      f'{topo["hosts"]} hosts); mesh {r["mesh"]}; global batch '
      f'{r["global_batch"]:,} ({r["per_chip_batch"]} per chip); '
      f'remat={r["model"]["remat"]} scan={r["model"]["scan"]}']
  if 'out_of_memory' in r:
    oom = r['out_of_memory']
    return '\n'.join(lines + [
        f'DOES NOT FIT: the TPU compiler ran out of HBM after '
        f'{r["compile_s"]:.0f} s: {oom["message"]}'])
  lines += [
      'per chip memory: arguments {argument}, outputs {output} ({alias} aliased '
      'to donated arguments), temporaries {temp}, code {code}'.format(
          **{k: _gib(v) for k, v in r['memory'].items()}),
      f'  total {_gib(r["memory"]["total"])} of {_gib(r["hbm_bytes"])} HBM: headroom '
      f'{100 * r["headroom"]:.1f}% (need >= {100 * r["min_headroom"]:.0f}%) -> '
      f'{"FITS" if r["fits"] else "DOES NOT FIT"}   [compiled in {r["compile_s"]:.0f} s]']
  if 'cost' in r:
    s = r['step_time']
    lines += [
        f'per chip cost: {r["cost"]["flops"]:.3e} FLOP, {r["cost"]["bytes"]:.3e} '
        f'HBM bytes, {r["cost"]["collective_bytes_sent"]:.3e} bytes sent in collectives '
        f'({r["cost"]["method"]})',
        f'step time (the compiler gives no time): compute {s["compute_s"]:.3f} s, HBM '
        f'{s["hbm_s"]:.3f} s, ICI {s["ici_s"]:.3f} s; overlapped max(...) = '
        f'{s["seconds"]:.3f} s ({s["bound"]}-bound), serial max(compute, HBM) + ICI = '
        f'{s["serial_s"]:.3f} s',
        f'throughput: {r["images_per_s"]:,.0f} images/s, '
        f'{r["images_per_s_per_host"]:,.0f} per host',
        f'MFU: {r["mfu"]:.3f} overlapped, {r["mfu_serial"]:.3f} serial (model FLOPs '
        f'{r["model_flops"]:.3e}/step: 3x '
        f'forward matmuls, no remat, over {topo["chips"]} x '
        f'{r["chip"]["peak_bf16_flops"]:.3g} bf16 FLOP/s)']
  return '\n'.join(lines)


def main(argv):
  if len(argv) > 1:
    sys.exit(f'mofi_jax.aot: error: unexpected arguments {argv[1:]}')
  try:
    for name in ('config', 'topology'):
      if not FLAGS[name].value:
        raise AotError(f'--{name} is required')
    topology = tpu_specs.parse(FLAGS.topology)
    config = config_files.load(FLAGS.config, FLAGS.set, flag=OVERRIDE_PREFIX)
    check_complete(config)
    report = analyse(config, topology, FLAGS.min_headroom, FLAGS.cost,
                     label=FLAGS.config)
  except (AotError, config_files.ConfigFileError, tpu_specs.TopologyError,
          sharding.ShardingError) as e:
    print(f'mofi_jax.aot: error: {e}', file=sys.stderr)
    sys.exit(2)
  except cli_errors.input_errors() as e:   # a config file's get_config() failing otherwise
    print(f'mofi_jax.aot: error: {cli_errors.one_line(e)}', file=sys.stderr)
    sys.exit(2)
  print(format_report(report))
  if FLAGS.json:
    with open(FLAGS.json, 'w') as f:
      json.dump(report, f, indent=2)
  sys.exit(0 if report['fits'] else 1)


def set_flags_of(argv):
  """argv with train's spelling of overrides, `--config.k=v` (or `--config.k v`), as
  `--set=k=v`, in the order given."""
  out, rest = [argv[0]], iter(argv[1:])
  for arg in rest:
    if arg.startswith(OVERRIDE_PREFIX):
      key, eq, value = arg[len(OVERRIDE_PREFIX):].partition('=')
      out.append(f'--set={key}={value if eq else next(rest, "")}')
    else:
      out.append(arg)
  return out


def parse_flags(argv):
  return FLAGS(set_flags_of(argv))


if __name__ == '__main__':
  app.run(main, flags_parser=parse_flags)
