r"""The paper configs x TPU slices table of docs/pod_scale.md: per-chip memory
and estimated step time, each cell from `python -m mofi_jax.aot` (compile-only,
on this CPU host).

  python benchmarks/pod_table.py --outdir /tmp/pod_table     # runs what is missing
  python benchmarks/pod_table.py --outdir /tmp/pod_table --table_only

TPU compiles of these programs take 5-20 minutes each on a small CPU host, so
the cost compiles (3 shallow, unrolled variants per cell, see
step_analysis.step_cost) run on the first slice only. Other slices take the
same global FLOPs and HBM bytes split over their chips: the global work of a
step does not depend on the slice (the per-chip cost scales with 1 / chips),
except that every chip also reads the all-gathered weights, so the scaled bytes
are a slight overestimate on smaller slices. Where a config's default does not
fit a slice, the next remat policy in FALLBACK is tried and noted.
"""
import json
import os
import subprocess
import sys

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_string('outdir', '/tmp/pod_table', 'JSON reports and logs.')
flags.DEFINE_bool('table_only', False, 'Only print the table from the reports.')
flags.DEFINE_list('configs', ['mofi_b16', 'mofi_l14', 'mofi_h14'], 'Config files.')
flags.DEFINE_list('slices', ['v5e-256', 'v4-128', 'v5p-128'],
                  'TPU slices; the first one gets the cost compiles.')

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FALLBACK = {'none': 'dots', 'dots': 'full', 'projections': 'full'}


def report_path(config, slice_name, remat=None):
  suffix = f'_{remat}' if remat else ''
  return os.path.join(FLAGS.outdir, f'{config}_{slice_name}{suffix}.json')


def run_aot(config, slice_name, with_cost, remat=None):
  """Runs the CLI unless its report exists; returns the report."""
  out = report_path(config, slice_name, remat)
  if not os.path.exists(out):
    cmd = [sys.executable, '-m', 'mofi_jax.aot',
           f'--config=configs/{config}.py:multitask', f'--topology={slice_name}',
           f'--json={out}', '--cost' if with_cost else '--nocost']
    if remat:
      cmd.append(f'--set=model.remat={remat}')
    print(' '.join(cmd[1:]), flush=True)
    with open(out.replace('.json', '.log'), 'w') as log:
      code = subprocess.run(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                            check=False).returncode
    if code not in (0, 1):
      raise RuntimeError(f'{cmd} failed ({code}); see {log.name}')
  with open(out) as f:
    return json.load(f)


def reports_for(config, slices):
  """{slice: report} with the first fitting remat policy on each slice."""
  out = {}
  for i, slice_name in enumerate(slices):
    report, remat = run_aot(config, slice_name, with_cost=i == 0), None
    while not report['fits'] and report['model']['remat'] in FALLBACK:
      remat = FALLBACK[report['model']['remat']]
      # Another policy is another program: it gets its own cost compiles.
      reference = out.get(slices[0], report)
      report = run_aot(config, slice_name, remat=remat, with_cost=(
          i == 0 or remat != reference['model']['remat']))
    out[slice_name] = report
  return out


def scaled_step_time(report, reference):
  """Step time on `report`'s slice from `reference`'s global cost."""
  chips, chip = report['topology']['chips'], report['chip']
  scale = reference['topology']['chips'] / chips
  flops = reference['cost']['flops'] * scale
  hbm_bytes = reference['cost']['bytes'] * scale
  return max(flops / chip['peak_bf16_flops'], hbm_bytes / chip['hbm_bytes_per_s'])


def table_row(config, slice_name, report, reference):
  gib = lambda n: f'{n / 2 ** 30:.2f}'
  head = f'| {config} | {slice_name} ({report["topology"]["name"]}) | '
  if 'out_of_memory' in report:
    oom = report['out_of_memory']
    return head + (f'{report["model"]["remat"]} | needs {gib(oom["required"])} '
                   f'of {gib(oom["available"])} GiB | - | - | - | - |')
  m = report['memory']
  if 'cost' in report:
    step_s, note = report['step_time']['seconds'], report['step_time']['bound']
    mfu = report['mfu']
  else:
    step_s, note = scaled_step_time(report, reference), 'scaled'
    chips, peak = report['topology']['chips'], report['chip']['peak_bf16_flops']
    mfu = reference['model_flops'] / chips / (step_s * peak)
  return head + (
      f'{report["model"]["remat"]} | {gib(m["argument"])} / {gib(m["temp"])} / '
      f'**{gib(m["total"])}** of {gib(report["hbm_bytes"])} | '
      f'{100 * report["headroom"]:.0f}%{"" if report["fits"] else " (does not fit)"} | '
      f'{step_s:.3f} ({note}) | '
      f'{report["global_batch"] / step_s:,.0f} | {mfu:.2f} |')


def main(argv):
  del argv
  os.makedirs(FLAGS.outdir, exist_ok=True)
  rows = []
  for config in FLAGS.configs:
    if FLAGS.table_only:
      reports = {}
      for s in FLAGS.slices:
        for remat in (None, 'dots', 'full'):
          if os.path.exists(report_path(config, s, remat)):
            with open(report_path(config, s, remat)) as f:
              reports[s] = json.load(f)
    else:
      reports = reports_for(config, FLAGS.slices)
    reference = reports.get(FLAGS.slices[0])
    rows += [table_row(config, s, r, reference) for s, r in reports.items()]
  print('| config (multitask) | slice | remat | per-chip GiB: arguments / '
        'temporaries / **total** of usable HBM | headroom | step s | images/s | '
        'MFU |')
  print('|---|---|---|---|---|---|---|---|')
  print('\n'.join(rows))


if __name__ == '__main__':
  app.run(main)
