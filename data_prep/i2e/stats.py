"""stats.json: counts in and out of every stage, drops by reason, entity frequencies.

Every stage result is a dict {'main', 'filtered', 'dead_letter'} of PCollections;
`StageTallies(stage)` turns one into ((stage, kind, reason), n) tallies, kind in
('out', 'filtered', 'dead_letter'). `build_stats` assembles stats.json from all tallies:

  {"inputs": N, "written": W, "filtered": {reason: n}, "dead_letter": {reason: n},
   "reconciled": true,
   "stages": [{"name": "read", "in": N, "out": n, "filtered": {...}, "dead_letter": {...}},
              ...],
   "entities": {"kept": C, "below_min_images": c, "images_per_entity": {"min", "median",
                "max"}, "histogram": {"5-7": c, "8-15": c, ...}, "top": [[id, n], ...]}}

Counts are exact (tallied from the PCollections, not from runner metrics, which some
runners report only as attempted); the same counts also go to live Beam counters
'i2e/<stage>.<kind>.<reason>' while the job runs. A stage's "in" is the previous stage's
"out"; the read stage's "in" is its output plus its dead letters, where an unreadable file counts
once whatever it held (see read.py). `check_reconciled` raises unless, for every stage,
in = out + filtered + dead_letter, and inputs = written + filtered + dead_letter overall.
"""
import apache_beam as beam

TOP_ENTITIES = 20
SHUFFLE_COUNTER = 'i2e_shuffle_bytes'


class ReconcileError(RuntimeError):
  """The stage counts do not add up: a record was lost or duplicated (a bug)."""


def count_shuffled(name, nbytes):
  """Adds to the live counter i2e_shuffle_bytes/<name>: the bytes a shuffle carries."""
  beam.metrics.Metrics.counter(SHUFFLE_COUNTER, name).inc(nbytes)


def shuffled_bytes(result):
  """{shuffle: bytes} from a finished pipeline's counters ({} where the runner has none)."""
  from apache_beam.metrics.metric import MetricsFilter  # pylint: disable=import-outside-toplevel
  try:
    counters = result.metrics().query(MetricsFilter().with_namespace(SHUFFLE_COUNTER))
  except Exception:  # pylint: disable=broad-except  # some runners do not report metrics
    return {}
  out = {}
  for c in counters['counters']:
    value = c.committed if c.committed is not None else c.attempted
    out[c.key.metric.name] = out.get(c.key.metric.name, 0) + (value or 0)
  return out


def shuffle_line(result, inputs):
  got = shuffled_bytes(result)
  if not got:
    return 'shuffled: (no counters from this runner)'
  per_pair = lambda n: f'{n / max(inputs, 1):,.0f} B/pair'
  return 'shuffled: ' + ', '.join(f'{k} {v / 2**20:.2f} MiB ({per_pair(v)})'
                                  for k, v in sorted(got.items())) + (
      f'; total {sum(got.values()) / 2**20:.2f} MiB ({per_pair(sum(got.values()))})')


def _live(element, stage, kind, reason, n):
  """Counts into the live counter i2e/<stage>.<kind>[.<reason>] (the Dataflow UI shows them
  while the job runs; stats.json is the exact end-of-run record); returns `element`."""
  name = f'{stage}.{kind}' + (f'.{reason}' if reason else '')
  beam.metrics.Metrics.counter('i2e', name).inc(n)
  return element


def _dead_tally(stage, dead):
  return (stage, 'dead_letter', dead.reason), dead.count


class StageTallies(beam.PTransform):
  """{'main', 'filtered', 'dead_letter'} -> ((stage, kind, reason), n), one per kind/reason."""

  def __init__(self, stage):
    super().__init__()
    self._stage = stage

  def expand(self, result):
    stage = self._stage
    _ = result['main'] | 'LiveOut' >> beam.Map(_live, stage, 'out', '', 1)
    out = (result['main'] | 'CountOut' >> beam.combiners.Count.Globally()
           | 'OutTally' >> beam.Map(lambda n: ((stage, 'out', ''), n)))
    filtered = result['filtered'] | 'FilteredTally' >> beam.Map(
        lambda f: _live(((stage, 'filtered', f.reason), f.count), stage, 'filtered', f.reason,
                        f.count))
    dead = result['dead_letter'] | 'DeadTally' >> beam.Map(
        lambda d: _live(_dead_tally(stage, d), stage, 'dead_letter', d.reason, d.count))
    return ((out, filtered, dead) | 'Tallies' >> beam.Flatten()
            | 'SumTallies' >> beam.CombinePerKey(sum))


def histogram_bins(counts):
  """{'lo-hi': entities} over power-of-two bins [2^k, 2^(k+1)-1], in increasing order."""
  bins = {}
  for n in sorted(int(c) for c in counts):
    lo = 1 << (n.bit_length() - 1) if n > 0 else 0
    label = f'{lo}-{max(lo, 2 * lo - 1)}'
    bins[label] = bins.get(label, 0) + 1
  return bins


def entity_stats(classes, entity_counts):
  """classes: kept ((id, n), ...) in class order; entity_counts: all (id, n) before the cut."""
  counts = [n for _, n in classes]
  summary = dict(kept=len(classes), below_min_images=len(entity_counts) - len(classes),
                 histogram=histogram_bins(counts), top=[list(c) for c in classes[:TOP_ENTITIES]])
  if counts:
    ordered = sorted(counts)
    summary['images_per_entity'] = dict(min=ordered[0], median=ordered[len(ordered) // 2],
                                        max=ordered[-1])
  return summary


def build_stats(tallies, stage_names, entities=None):
  """Tallies ((stage, kind, reason), n) of stages `stage_names` (in order) -> stats dict."""
  tallies = dict(tallies)
  unknown = sorted({s for s, _, _ in tallies} - set(stage_names))
  if unknown:
    raise ValueError(f'build_stats: tallies for unknown stage(s) {unknown}.')
  stages, totals = [], {'filtered': {}, 'dead_letter': {}}
  prev_out = None
  for name in stage_names:
    out = tallies.get((name, 'out', ''), 0)
    drops = {'filtered': {}, 'dead_letter': {}}
    for (stage, kind, reason), n in sorted(tallies.items()):
      if stage == name and kind != 'out':
        drops[kind][reason] = n
        totals[kind][reason] = totals[kind].get(reason, 0) + n
    if prev_out is None:  # The first stage: everything it saw left one way or another.
      prev_out = out + sum(drops['filtered'].values()) + sum(drops['dead_letter'].values())
    stages.append({'name': name, 'in': prev_out, 'out': out, **drops})
    prev_out = out
  stats = dict(inputs=stages[0]['in'] if stages else 0,
               written=stages[-1]['out'] if stages else 0,
               filtered=totals['filtered'], dead_letter=totals['dead_letter'], stages=stages)
  stats['reconciled'] = not reconcile_errors(stats)
  if entities is not None:
    stats['entities'] = entities
  return stats


def stage_table(stats):
  """One line per stage: records in and out, and what left where, with reasons."""
  def drops(d):
    return ', '.join(f'{reason} {n}' for reason, n in sorted(d.items())) or '-'
  width = max([len(r['name']) for r in stats['stages']] + [5])
  lines = [f'{"stage":{width}s} {"in":>9s} {"out":>9s}  filtered | dead-lettered']
  for r in stats['stages']:
    lines.append(f'{r["name"]:{width}s} {r["in"]:9d} {r["out"]:9d}  {drops(r["filtered"])} | '
                 f'{drops(r["dead_letter"])}')
  return '\n'.join(lines)


def reconcile_errors(stats):
  """Human-readable mismatches; empty when every count adds up."""
  errors = []
  for row in stats['stages']:
    accounted = row['out'] + sum(row['filtered'].values()) + sum(row['dead_letter'].values())
    if row['in'] != accounted:
      errors.append(f"stage {row['name']}: in {row['in']} != out {row['out']} + filtered "
                    f"{row['filtered']} + dead_letter {row['dead_letter']}")
  accounted = (stats['written'] + sum(stats['filtered'].values()) +
               sum(stats['dead_letter'].values()))
  if stats['inputs'] != accounted:
    errors.append(f"inputs {stats['inputs']} != written {stats['written']} + filtered "
                  f"{stats['filtered']} + dead_letter {stats['dead_letter']}")
  return errors


def check_reconciled(stats):
  errors = reconcile_errors(stats)
  if errors:
    raise ReconcileError('I2E counts do not reconcile: ' + '; '.join(errors))
  return stats
