r"""I2E at Wikidata scale: KB build time and the memory of the workers that find and link.

  python benchmarks/i2e_scale.py --entities 100000
  python benchmarks/i2e_scale.py --entities 1000000 --pairs 20000 --workdir /tmp/i2e_scale_1m

1. Writes a Wikidata-shaped dump of N items as line-aligned chunks (wikidata_synth.py).
2. Builds the KB with `python -m data_prep.build_kb` (Beam DirectRunner, --workers
   processes): kb_build_s.
3. Runs mentions + linking (the FindMentions and LinkEntities stages) over a fixed set of
   alt-texts on Beam's DirectRunner in multi_processing mode: --workers SDK worker processes
   (apache_beam.runners.worker.sdk_worker_main), each opening the KB the way a Dataflow
   worker does. A sampler reads every worker's peak RSS (VmHWM) and CPU time from /proc.

The last line is one JSON object: entities, aliases, kb_build_s, peak_rss_mib (the largest
SDK worker's peak RSS during mentions + linking), peak_rss_anon_mib (its private part; the
rest is the mapped index, shared by every process of a VM through the page cache),
pairs_per_cpu_s, and the sizes behind them.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time

import psutil

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path[:0] = [ROOT, HERE]

# pylint: disable=wrong-import-position
import wikidata_synth  # noqa: E402


class WorkerSampler(threading.Thread):
  """Polls the descendants of this process that run an SDK worker: peak RSS, CPU seconds."""

  def __init__(self, period=0.2):
    super().__init__(daemon=True)
    self.period, self.peak, self.cpu, self._done = period, {}, {}, threading.Event()

  def run(self):
    me = psutil.Process()
    while not self._done.is_set():
      for p in me.children(recursive=True):
        try:
          if 'sdk_worker' not in ' '.join(p.cmdline()):
            continue
          with open(f'/proc/{p.pid}/status') as f:
            status = dict(l.split(':', 1) for l in f if ':' in l)
          kib = lambda k: int(status.get(k, '0 kB').split()[0])
          hwm, anon = kib('VmHWM'), kib('RssAnon')
          old = self.peak.get(p.pid, (0, 0))
          self.peak[p.pid] = (max(old[0], hwm), max(old[1], anon))
          t = p.cpu_times()
          self.cpu[p.pid] = t.user + t.system
        except (psutil.Error, OSError):
          continue
      self._done.wait(self.period)

  def stop(self):
    self._done.set()
    self.join()


def parse_rate(dump_glob, limit=50_000):
  """(items, MB of JSON) per CPU-second of wikidata.parse_item alone, on one core."""
  import glob  # pylint: disable=import-outside-toplevel
  import gzip  # pylint: disable=import-outside-toplevel
  from data_prep.i2e import wikidata  # pylint: disable=import-outside-toplevel
  with gzip.open(sorted(glob.glob(dump_glob))[0]) as f:
    lines = [line for _, line in zip(range(limit), f)]
  start = time.process_time()
  for line in lines:
    try:
      wikidata.parse_item(line, excluded_types=wikidata.DEFAULT_EXCLUDED_TYPES)
    except Exception:  # pylint: disable=broad-except  # skipped kinds raise, as in the stage
      pass
  cpu = time.process_time() - start
  return len(lines) / cpu, sum(map(len, lines)) / 1e6 / cpu


def build_kb(dump_glob, kb_dir, workers):
  """-> (seconds, the largest SDK worker's peak RSS in MiB) of python -m data_prep.build_kb."""
  cmd = [sys.executable, '-m', 'data_prep.build_kb', '--wikidata', dump_glob, '--out', kb_dir,
         f'--direct_num_workers={workers}', '--direct_running_mode=multi_processing']
  sampler = WorkerSampler(period=1.0)
  sampler.start()
  start = time.time()
  proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=False)
  sampler.stop()
  if proc.returncode:
    sys.exit(f'i2e_scale: build_kb failed:\n{proc.stderr[-3000:]}')
  return time.time() - start, max((p[0] for p in sampler.peak.values()), default=0) / 1024


def find_and_link(kb_dir, texts, workers):
  """Runs FindMentions + LinkEntities on DirectRunner worker processes; returns the counts
  and the sampler."""
  import apache_beam as beam  # pylint: disable=import-outside-toplevel
  from apache_beam.options.pipeline_options import PipelineOptions  # pylint: disable=import-outside-toplevel
  from data_prep.i2e import link, mentions, types  # pylint: disable=import-outside-toplevel
  out = tempfile.mkdtemp(prefix='i2e_scale_out_')
  options = PipelineOptions([f'--direct_num_workers={workers}',
                             '--direct_running_mode=multi_processing'])
  sampler = WorkerSampler()
  sampler.start()
  start = time.time()
  with beam.Pipeline(options=options) as p:
    pairs = (p | beam.Create([(f'{i:08d}', t) for i, t in enumerate(texts)])
             | beam.Reshuffle()
             | beam.Map(lambda kt: types.Pair(key=kt[0], image=b'', text=kt[1], source='b')))
    found = pairs | mentions.FindMentions(kb_dir)
    linked = found['main'] | link.LinkEntities(kb_dir)
    _ = ((linked['main'] | 'N' >> beam.Map(lambda lp: ('linked', len(lp.candidates))),
          found['main'] | 'M' >> beam.Map(lambda mp: ('mentions', len(mp.mentions))))
         | beam.Flatten() | beam.CombinePerKey(sum)
         | beam.Map(json.dumps) | beam.io.WriteToText(os.path.join(out, 'counts')))
  wall = time.time() - start
  sampler.stop()
  counts = {}
  for name in os.listdir(out):
    with open(os.path.join(out, name)) as f:
      counts.update(dict(json.loads(l) for l in f))
  return counts, sampler, wall


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--entities', type=int, default=100_000)
  parser.add_argument('--pairs', type=int, default=20_000)
  parser.add_argument('--workers', type=int, default=2)
  parser.add_argument('--workdir', default=None, help='keeps the dump and KB (default: tmp)')
  parser.add_argument('--seed', type=int, default=0)
  args = parser.parse_args(argv)
  work = args.workdir or tempfile.mkdtemp(prefix=f'i2e_scale_{args.entities}_')
  dump_dir, kb_dir = os.path.join(work, 'dump'), os.path.join(work, 'kb')
  start = time.time()
  dump_glob, dump_bytes = wikidata_synth.write_dump(dump_dir, args.entities, args.seed,
                                                    workers=args.workers)
  dump_s = time.time() - start
  print(f'dump: {args.entities} items, {dump_bytes / 2**20:.0f} MiB gzip in {dump_s:.0f}s')
  parse_items, parse_mb = parse_rate(dump_glob)
  kb_build_s, kb_rss = (build_kb(dump_glob, kb_dir, args.workers) if not os.path.exists(
      os.path.join(kb_dir, 'kb.json')) else (float('nan'), float('nan')))
  with open(os.path.join(kb_dir, 'kb.json')) as f:
    meta = json.load(f)
  index_bytes = sum(os.path.getsize(os.path.join(kb_dir, n))
                    for names in meta['index_files'].values() for n in names)
  print(f'kb: {meta["num_entities"]} entities, {meta["num_aliases"]} aliases, index '
        f'{index_bytes / 2**20:.0f} MiB, built in {kb_build_s:.0f}s; skipped {meta["skipped"]}')
  from data_prep.i2e import kb as kb_lib  # pylint: disable=import-outside-toplevel
  texts = wikidata_synth.alt_texts(kb_lib.KnowledgeBase.load(kb_dir), args.pairs, args.seed)
  counts, sampler, wall = find_and_link(kb_dir, texts, args.workers)
  peak = max(sampler.peak.values(), default=(0, 0))
  cpu = sum(sampler.cpu.values())
  result = dict(entities=meta['num_entities'], items=args.entities,
                aliases=meta['num_aliases'], kb_build_s=round(kb_build_s, 1),
                kb_items_per_cpu_s=round(args.entities / (kb_build_s * args.workers), 1),
                kb_build_worker_rss_mib=round(kb_rss, 1),
                parse_items_per_cpu_s=round(parse_items), parse_mb_per_cpu_s=round(parse_mb, 1),
                dump_mib=round(dump_bytes / 2**20, 1), index_mib=round(index_bytes / 2**20, 1),
                peak_rss_mib=round(peak[0] / 1024, 1), peak_rss_anon_mib=round(peak[1] / 1024, 1),
                sdk_workers=len(sampler.peak), pairs=args.pairs, mentions=counts.get('mentions'),
                linked=counts.get('linked'), link_wall_s=round(wall, 1),
                worker_cpu_s=round(cpu, 1), pairs_per_cpu_s=round(args.pairs / cpu, 1) if cpu
                else None)
  print(json.dumps(result))


if __name__ == '__main__':
  main()
