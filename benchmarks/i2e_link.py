r"""I2E stages c+d throughput: pairs/s per core for mention finding (the KB's mapped surface
index) and entity linking, on a generated KB and generated alt-texts.

  python benchmarks/i2e_link.py                         # 50k entities, 5k alt-texts, 1 core
  python benchmarks/i2e_link.py --entities 200000 --pairs 20000 --no-beam
  python benchmarks/i2e_link.py --zipf 1.3 --no-beam    # homonyms shared by thousands of items

--zipf S draws each homonym's label from the earlier entities by a Zipf(S) rank, so a few
names ('John Smith', 'St. Mary's Church') are carried by thousands of items, as in Wikidata;
the report gives the largest alias's candidate count.

The process is pinned to --cores CPUs (default 1) before anything starts its thread pools, so the
figures are per core. The KB mimics Wikidata's shape: multi-word names, 20% homonym labels
(ambiguous aliases), short aliases, Zipf-like sitelink counts, descriptions drawn from topics
(so that coherence has something to find). Each alt-text has 10-20 filler words and 0-3 entity
names of one topic, some lower-cased. Rates are pairs per CPU-second of this process (see
`timed`), so a busy machine does not deflate them. Reported:
  setup       KB load + PhraseMatcher build (once per worker)
  mentions    MentionFinder.find, batches of 64 texts
  link        EntityLinker.link, one pair at a time
  both        the two stages back to back (what a worker does per pair)
  beam        FindMentions | LinkEntities on the in-memory DirectRunner (1 worker, warm caches)
"""
import argparse
import os
import sys
import tempfile
import time


def pin(cores):
  avail = sorted(os.sched_getaffinity(0))
  os.sched_setaffinity(0, avail[:cores])
  return len(avail[:cores])


SYLLABLES = ('ka to ri mo na lu be sa vi do re ga po li zu me ta ko ru ni ha se fu yo wa mi '
             'ra ke so an el or um ix al en').split()
FILLER = ('photo of the a an in on at with and by from view near old new small big night day '
          'free download image stock picture close up high quality wallpaper background').split()


def _word(rng):
  return ''.join(rng.choice(SYLLABLES, size=rng.integers(2, 4))).capitalize()


def make_kb(rng, n, topics=300, zipf=0.0):
  from data_prep.i2e import types  # pylint: disable=import-outside-toplevel
  topic_words = [[_word(rng).lower() for _ in range(30)] for _ in range(topics)]
  entities, by_topic = [], [[] for _ in range(topics)]
  for i in range(n):
    topic = int(rng.integers(topics))
    if i > 100 and rng.random() < 0.2:
      pick = (min(int(rng.zipf(zipf)) - 1, len(entities) - 1) if zipf
              else int(rng.integers(len(entities))))
      label = entities[pick].label                                          # a homonym
    else:
      label = ' '.join(_word(rng) for _ in range(int(rng.integers(1, 4))))
    aliases = []
    if ' ' in label and rng.random() < 0.5:
      aliases.append(label.split()[-1])
    if rng.random() < 0.3:
      aliases.append(''.join(w[0] for w in label.split()).upper() + _word(rng)[:2].upper())
    desc = ' '.join(rng.choice(topic_words[topic], size=int(rng.integers(4, 9))))
    sitelinks = int(rng.pareto(1.2) * 5)
    entities.append(types.Entity(f'Q{i + 1}', label, desc, tuple(aliases), sitelinks))
    by_topic[topic].append(i)
  return entities, by_topic


def make_texts(rng, entities, by_topic, n):
  texts = []
  for _ in range(n):
    words = list(rng.choice(FILLER, size=int(rng.integers(10, 21))))
    topic = by_topic[int(rng.integers(len(by_topic)))]
    for _ in range(int(rng.integers(0, 4)) if topic else 0):
      e = entities[topic[int(rng.integers(len(topic)))]]
      name = e.aliases[0] if e.aliases and rng.random() < 0.3 else e.label
      words.insert(int(rng.integers(len(words) + 1)), name.lower() if rng.random() < 0.2 else name)
    texts.append(' '.join(words))
  return texts


def timed(fn):
  """(result, CPU seconds of this process). Pinned to one core, CPU time is the per-core cost
  even when other processes share the core; wall time would count their turns too."""
  start = time.process_time()
  out = fn()
  return out, time.process_time() - start


def run_beam(kb_dir, texts):
  # pylint: disable=import-outside-toplevel
  import apache_beam as beam
  from apache_beam.options.pipeline_options import PipelineOptions
  from data_prep.i2e import link, mentions, types
  pairs = [types.Pair(f'k{i}', b'', t, 'bench') for i, t in enumerate(texts)]
  opts = PipelineOptions(['--runner=DirectRunner', '--direct_running_mode=in_memory',
                          '--direct_num_workers=1'])
  with beam.Pipeline(options=opts) as p:
    found = p | beam.Create(pairs) | mentions.FindMentions(kb_dir)
    _ = found['main'] | link.LinkEntities(kb_dir)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--entities', type=int, default=50_000)
  parser.add_argument('--pairs', type=int, default=5_000)
  parser.add_argument('--cores', type=int, default=1)
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--beam', action=argparse.BooleanOptionalAction, default=True)
  parser.add_argument('--zipf', type=float, default=0.0,
                      help='> 1: homonym labels by a Zipf rank (see the docstring)')
  args = parser.parse_args(argv)
  cores = pin(args.cores)
  import numpy as np  # pylint: disable=import-outside-toplevel
  from data_prep.i2e import kb, link, mentions  # pylint: disable=import-outside-toplevel

  rng = np.random.default_rng(args.seed)
  entities, by_topic = make_kb(rng, args.entities, zipf=args.zipf)
  texts = make_texts(rng, entities, by_topic, args.pairs)
  kb_dir = os.path.join(tempfile.mkdtemp(prefix='i2e_link_bench_'), 'kb')
  kb.write_small_kb(kb_dir, entities)

  knowledge_base, t_load = timed(lambda: kb.load_cached(kb_dir))
  finder, t_matcher = timed(lambda: mentions._cached_finder(   # pylint: disable=protected-access
      kb_dir, ner_model='', ner_labels=mentions.DEFAULT_NER_LABELS, use_alias_matcher=True,
      max_mentions=16, ner_gate=False))
  from configs import i2e as i2e_config  # pylint: disable=import-outside-toplevel
  linker = link._cached_linker(kb_dir, **dict(i2e_config.get_config().link))  # pylint: disable=protected-access
  found, t_find = timed(lambda: [m for i in range(0, len(texts), 64)
                                 for m in finder.find(texts[i:i + 64])])
  linked, t_link = timed(lambda: [linker.link(m) for m in found])

  n = len(texts)
  n_mentions = sum(len(m) for m in found)
  print(f'i2e_link: {len(knowledge_base)} entities, {knowledge_base.meta["num_aliases"]} '
        f'aliases; {n} alt-texts, {n_mentions} mentions, '
        f'{sum(len(c) for c in linked)} linked entities; {cores} core(s)')
  labels = {}
  for e in entities:
    labels[e.label] = labels.get(e.label, 0) + 1
  print(f'  homonyms  the most shared label names {max(labels.values())} items; '
        f'{sum(1 for v in labels.values() if v >= 100)} labels name >= 100')
  print(f'  setup     KB load {t_load:.2f} + matcher build {t_matcher:.2f} CPU-s (once per worker)')
  print(f'  mentions  {n / t_find:10.1f} pairs/s per core')
  print(f'  link      {n / t_link:10.1f} pairs/s per core')
  print(f'  both      {n / (t_find + t_link):10.1f} pairs/s per core')
  if args.beam:
    _, t_beam = timed(lambda: run_beam(kb_dir, texts))
    print(f'  beam      {n / t_beam:10.1f} pairs/s per core (in-memory DirectRunner, warm caches)')
  return 0


if __name__ == '__main__':
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  sys.exit(main())
