"""The excluded kinds of item, closed over P279 (subclass of): build_kb's first pass.

Wikidata types most items by a specific class ('male given name', 'Wikimedia human name
disambiguation page', a protein family), not by the root that DEFAULT_EXCLUDED_TYPES lists.
So before the main pass, one pass over the dump collects every item's P279 parents as
(child, parent) Q-numbers, two int64 each: a byte search skips the ~95% of lines that carry no
P279 before any JSON parsing. One worker then walks the hierarchy down from the roots; the
closed set (the roots' descendants, thousands to some hundred thousand classes) is a side
input of the main pass, held as two sorted arrays (ClassKinds), 12 bytes a class, so that
every SDK process can afford its copy.

A class under several roots takes its nearest root's reason (breadth first, ties to the
smallest reason), so 'male given name' counts as itself, not as 'given name'. Each class is
visited once, so a cycle in P279 ends.
"""
import array

import apache_beam as beam
import numpy as np

from data_prep.i2e import wikidata

SUBCLASS_OF = 'P279'
_NEEDLE = b'"P279"'


def subclass_edges(element):
  """(source, dump line) -> [(child, parent)] Q-numbers of an item's P279 statements.

  Lines that the main pass skips or dead-letters give no edge here; a malformed P279 gives
  none either and is counted (kb/bad_subclass_claim), since the main pass does not read P279.
  """
  line = element[1]
  if _NEEDLE not in line:   # cheap: most lines have no P279 anywhere
    return []
  try:
    obj = wikidata._decode(line)   # pylint: disable=protected-access
  except wikidata._Bad:            # pylint: disable=protected-access
    return []
  if obj is None or obj['type'] != 'item' or not wikidata.is_qid(obj['id']):
    return []
  try:
    parents = wikidata.item_claims(obj.get('claims'), SUBCLASS_OF, obj['id'])
  except wikidata._Bad:            # pylint: disable=protected-access
    beam.metrics.Metrics.counter(wikidata.STAGE, 'bad_subclass_claim').inc()
    return []
  child = int(obj['id'][1:])
  return [(child, int(p[1:])) for p in parents if wikidata.is_qid(p)]


class EdgeArray(beam.CombineFn):
  """(child, parent) pairs -> one int64 array of shape (n, 2). Accumulators are flat
  array('q'): 16 bytes an edge, pickled as raw bytes between workers."""

  def create_accumulator(self):
    return array.array('q')

  def add_input(self, mutable_accumulator, element):
    mutable_accumulator.extend(element)
    return mutable_accumulator

  def merge_accumulators(self, accumulators):
    out = array.array('q')
    for acc in accumulators:
      out.extend(acc)
    return out

  def extract_output(self, accumulator):
    return np.frombuffer(accumulator, dtype=np.int64).reshape(-1, 2).copy()


def close_over_subclasses(roots, edges):
  """{root Q-id: reason}, (n, 2) (child, parent) Q-numbers -> {Q-number: reason} of the roots
  and all their P279 descendants, each with its nearest root's reason (ties: the smallest)."""
  edges = np.asarray(edges, dtype=np.int64).reshape(-1, 2)
  order = np.argsort(edges[:, 1], kind='stable')
  parents, children = edges[order, 1], edges[order, 0]
  reason_of = {int(q[1:]): r for q, r in roots.items()}
  frontier = dict(reason_of)
  while frontier:   # one level of the hierarchy per round
    reached = {}
    for node, reason in sorted(frontier.items()):
      lo, hi = np.searchsorted(parents, [node, node + 1])
      for child in children[lo:hi].tolist():
        if child not in reason_of:
          reached[child] = min(reached.get(child, reason), reason)
    reason_of.update(reached)
    frontier = reached
  return reason_of


class ClassKinds:
  """{class Q-id: reason} as sorted Q-numbers and reason codes; .get as a dict's."""

  def __init__(self, reason_of, num_edges=0):
    self.reasons = tuple(sorted(set(reason_of.values())))
    code = {r: i for i, r in enumerate(self.reasons)}
    self.ids = np.array(sorted(reason_of), dtype=np.int64)
    self.codes = np.array([code[reason_of[i]] for i in self.ids.tolist()], dtype=np.int32)
    self.num_edges = num_edges

  def get(self, qid, default=None):
    if not wikidata.is_qid(qid):
      return default
    number = int(qid[1:])
    i = int(np.searchsorted(self.ids, number))
    if i < len(self.ids) and self.ids[i] == number:
      return self.reasons[self.codes[i]]
    return default

  def __len__(self):
    return len(self.ids)

  def summary(self):
    """kb.json's record of the closure: classes per reason, and the edges it was built from."""
    counts = np.bincount(self.codes, minlength=len(self.reasons)).tolist()
    return dict(subclass_closure=True, subclass_edges=self.num_edges,
                excluded_classes=dict(zip(self.reasons, counts)))


class SubclassClosure(beam.PTransform):
  """(source, line) -> one ClassKinds: `roots` {Q-id: reason} and their P279 descendants."""

  def __init__(self, roots):
    super().__init__()
    self._roots = dict(roots)

  def expand(self, lines):
    roots = self._roots
    return (lines
            | 'SubclassEdges' >> beam.FlatMap(subclass_edges)
            | 'AllEdges' >> beam.CombineGlobally(EdgeArray())
            | 'Close' >> beam.Map(lambda e: ClassKinds(close_over_subclasses(roots, e), len(e))))
