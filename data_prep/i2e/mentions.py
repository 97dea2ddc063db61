"""Stage c: find entity mentions in alt-texts with spaCy.

Two sources of spans, merged:
  * the KB alias matcher (default; needs no model download): the alt-text is split by spaCy's
    blank English tokenizer and, from each token, the run of lower-cased tokens is looked up in
    the KB's memory-mapped trie of surface keys (kb_index.py); one prefix query returns every
    label or alias that starts there. It matches whole tokens, case-insensitively ('paris' in
    'PARIS, at night', not in 'Parisian'), exactly as a spaCy PhraseMatcher with attr='LOWER'
    over every surface form would (tests/test_i2e_mentions.py holds one as the reference),
    without one Python pattern per alias: a worker's memory does not grow with the KB.
  * a statistical NER pipeline when `ner_model` names one (an installed package such as
    en_core_web_sm / en_core_web_trf, or a pipeline folder saved with `nlp.to_disk`); only entities
    with a label in `ner_labels` are kept. Naming a pipeline that is not installed is an error at
    construction, with the command that installs it. `python -m data_prep.train_ner` trains one
    (label ENTITY) from the KB and the alt-texts when no pretrained pipeline can be installed.

With `ner_gate=True` the NER gates the alias matcher: an alias hit is a mention only if it lies
inside a span the NER found, and NER spans that hold no alias are not mentions. At Wikidata
scale this is what keeps 'sunset over the lake' and 'a red apple' from mentioning the film
Sunset and the company Apple (docs/i2e.md has the figures). A determiner or title inside the
NER span does not matter: 'the Eiffel Tower' holds the alias hit 'Eiffel Tower'. A gated hit
carries the NER span's origin ('ner:<LABEL>').

Alias hits that are one character long, or lower-case and made only of stop words, numbers and
punctuation ('it', 'her', '1984', 'the who') are dropped: Wikidata has items with such labels and
every alt-text would mention them.

Merging: spans are ranked longest first, then earliest; a span is kept unless it overlaps one kept
before (so 'New York City' beats 'New York' and 'York'). A span found by both sources is kept once,
with the NER origin ('ner:<LABEL>'), which carries the type. At most `max_mentions` survive, the
first ones in text order. Pairs with no mention leave as filtered 'no_mention'.

The KB is opened and the NER pipeline loaded once per worker process (DoFn.setup + a process
cache), and texts go through `Language.pipe` in batches.
"""
import dataclasses
import importlib.util
import os
import threading

import apache_beam as beam

from data_prep.i2e import kb as kb_lib
from data_prep.i2e import kb_index, types

STAGE = 'mentions'
KB_ORIGIN = 'kb'
# OntoNotes' name types (en_core_web_*), and ENTITY, the one label data_prep.train_ner trains.
DEFAULT_NER_LABELS = ('PERSON', 'ORG', 'GPE', 'LOC', 'PRODUCT', 'WORK_OF_ART', 'EVENT', 'FAC',
                      'NORP', 'ENTITY')
# Components that entity recognition never needs; skipped in Language.pipe for speed.
_NOT_FOR_NER = ('tagger', 'parser', 'lemmatizer', 'trainable_lemmatizer', 'morphologizer',
                'senter', 'attribute_ruler', 'textcat', 'textcat_multilabel')


def check_ner_model(ner_model):
  """Raises ValueError, with the install command, unless `ner_model` is '' or loadable."""
  if not ner_model:
    return
  if os.path.isdir(ner_model):
    if not os.path.exists(os.path.join(ner_model, 'config.cfg')):
      raise ValueError(f'mentions.ner_model={ner_model!r} is a folder without config.cfg; '
                       'expected a spaCy pipeline saved with nlp.to_disk().')
    return
  if importlib.util.find_spec(ner_model.replace('-', '_')) is None:
    raise ValueError(
        f'mentions.ner_model={ner_model!r}: no such spaCy pipeline is installed. Install it with '
        f'`python -m spacy download {ner_model}` (or `pip install` its wheel from '
        'https://github.com/explosion/spacy-models/releases), or set mentions.ner_model=\'\' to '
        'use the knowledge-base alias matcher alone.')


def merge_spans(mentions, max_mentions=0):
  """Overlap resolution: longest first, then earliest; duplicates of one span kept once.

  Among identical spans an NER one is preferred to a KB one. Returns mentions in text order,
  at most `max_mentions` (0 = all).
  """
  ranked = sorted(mentions, key=lambda m: (-(m.end - m.start), m.start,
                                           m.origin == KB_ORIGIN, m.origin))
  kept = []
  for m in ranked:
    if m.end > m.start and all(m.end <= k.start or m.start >= k.end for k in kept):
      kept.append(m)
  kept.sort(key=lambda m: m.start)
  return tuple(kept[:max_mentions] if max_mentions else kept)


def _is_function_words(span):
  """Alias hits that are noise: one character, or lower-case stop words / numbers / punctuation
  only (Wikidata has items labelled 'A', 'It', 'Her', '1984'; 'The Who' as written is kept)."""
  if len(span.text) < 2:
    return True
  return span.text == span.text.lower() and all(t.is_stop or t.is_punct or t.like_num
                                                for t in span)


class MentionFinder:
  """Texts -> merged mentions; the logic of the stage without Beam (also used by benchmarks)."""

  def __init__(self, kb=None, ner_nlp=None, ner_labels=DEFAULT_NER_LABELS, max_mentions=16,
               ner_gate=False):
    if kb is None and ner_nlp is None:
      raise ValueError('MentionFinder needs a knowledge base (alias matcher) or an NER pipeline.')
    if ner_gate and (kb is None or ner_nlp is None):
      raise ValueError('mentions.ner_gate needs both the alias matcher and an NER pipeline.')
    self._ner, self._labels, self._max = ner_nlp, frozenset(ner_labels), max_mentions
    self._gate = ner_gate
    self._kb = kb
    self._tokenizer = kb_lib.surface_tokenizer() if kb is not None else None
    self._disable = [] if ner_nlp is None else [
        p for p in ner_nlp.pipe_names if p in _NOT_FOR_NER]

  def _kb_spans(self, texts):
    if self._kb is None:
      return [[] for _ in texts]
    return [[types.Mention(s.start_char, s.end_char, s.text, KB_ORIGIN)
             for s in self._alias_spans(doc) if not _is_function_words(s)]
            for doc in self._tokenizer.pipe(texts)]

  def alias_spans(self, text):
    """[(start_char, end_char)] of every KB surface key in `text`, overlaps included, before
    the function-word filter and the merge."""
    return sorted((s.start_char, s.end_char) for s in self._alias_spans(self._tokenizer(text)))

  def _alias_spans(self, doc):
    """Every token span of `doc` whose lower-cased tokens are a KB surface key."""
    lowers = [t.lower_ for t in doc]
    joined = kb_index.SEP.join(lowers)
    offset = 0
    for i, first in enumerate(lowers):
      for key in self._kb.surface_prefixes(first, joined[offset:]):
        yield doc[i:i + key.count(kb_index.SEP) + 1]
      offset += len(first) + 1

  def _ner_spans(self, texts):
    if self._ner is None:
      return [[] for _ in texts]
    return [[types.Mention(e.start_char, e.end_char, e.text, f'ner:{e.label_}')
             for e in doc.ents if e.label_ in self._labels]
            for doc in self._ner.pipe(texts, disable=self._disable)]

  def find(self, texts):
    """list[str] -> list[tuple[Mention, ...]], merged, in text order."""
    texts = list(texts)
    combine = gate_spans if self._gate else lambda a, b: a + b
    return [merge_spans(combine(a, b), self._max)
            for a, b in zip(self._kb_spans(texts), self._ner_spans(texts))]


def gate_spans(alias_hits, ner_spans):
  """The alias hits that lie inside an NER span, each with that span's origin."""
  gated = []
  for hit in alias_hits:
    around = [n for n in ner_spans if n.start <= hit.start and hit.end <= n.end]
    if around:
      gated.append(dataclasses.replace(hit, origin=around[0].origin))
  return gated


_FINDERS = {}
_FINDERS_LOCK = threading.Lock()


def _cached_finder(kb_dir, ner_model, ner_labels, use_alias_matcher, max_mentions, ner_gate):
  """One MentionFinder per worker process and setting (over the process's one mapped KB)."""
  key = (kb_dir, ner_model, tuple(ner_labels), use_alias_matcher, max_mentions, ner_gate)
  with _FINDERS_LOCK:
    if key not in _FINDERS:
      import spacy  # pylint: disable=import-outside-toplevel
      kb = kb_lib.load_cached(kb_dir) if use_alias_matcher else None
      nlp = spacy.load(ner_model) if ner_model else None
      _FINDERS[key] = MentionFinder(kb, nlp, ner_labels, max_mentions, ner_gate)
    return _FINDERS[key]


class _FindMentionsFn(beam.DoFn):
  """Batches of Pairs -> MentionedPair | filtered 'no_mention' | dead letter 'mentions_error'."""

  def __init__(self, settings):
    self._settings = settings
    self._finder = None

  def setup(self):
    self._finder = _cached_finder(**self._settings)

  def process(self, batch):
    try:
      found = self._finder.find([p.text for p in batch])
    except Exception:  # pylint: disable=broad-except
      found = None     # find the culprit: one pair at a time
    for i, pair in enumerate(batch):
      try:
        mentions = found[i] if found is not None else self._finder.find([pair.text])[0]
      except Exception as e:  # pylint: disable=broad-except
        yield beam.pvalue.TaggedOutput(types.DEAD_LETTER, types.DeadLetter(
            STAGE, 'mentions_error', pair.key, pair.source, f'{type(e).__name__}: {e}'[:300]))
        continue
      if mentions:
        yield types.MentionedPair(pair, mentions)
      else:
        yield beam.pvalue.TaggedOutput(types.FILTERED, types.Filtered(STAGE, 'no_mention',
                                                                      pair.key))


class FindMentions(beam.PTransform):
  """Pair -> {'main': MentionedPair, 'dead_letter': DeadLetter, 'filtered': Filtered}."""

  def __init__(self, kb_dir, ner_model='', ner_labels=DEFAULT_NER_LABELS,
               use_alias_matcher=True, max_mentions=16, ner_gate=False, batch_size=64):
    super().__init__()
    if not use_alias_matcher and not ner_model:
      raise ValueError('mentions: use_alias_matcher=False and no ner_model: nothing would find '
                       'mentions; set one of them.')
    if ner_gate and not (use_alias_matcher and ner_model):
      raise ValueError('mentions.ner_gate=True gates the alias matcher with the NER: it needs '
                       f'use_alias_matcher=True and a ner_model (got use_alias_matcher='
                       f'{use_alias_matcher}, ner_model={ner_model!r}).')
    if max_mentions < 0:
      raise ValueError(f'mentions.max_mentions must be >= 0 (0 = all), got {max_mentions}')
    check_ner_model(ner_model)
    if use_alias_matcher:
      kb_lib.check_kb_dir(kb_dir)
    self._settings = dict(kb_dir=kb_dir, ner_model=ner_model, ner_labels=tuple(ner_labels),
                          use_alias_matcher=use_alias_matcher, max_mentions=max_mentions,
                          ner_gate=ner_gate)
    self._batch_size = batch_size

  def expand(self, pairs):
    out = (pairs
           | 'Batch' >> beam.BatchElements(min_batch_size=1, max_batch_size=self._batch_size)
           | 'Find' >> beam.ParDo(_FindMentionsFn(self._settings))
           .with_outputs(types.DEAD_LETTER, types.FILTERED, main='main'))
    return {'main': out.main, 'dead_letter': out[types.DEAD_LETTER],
            'filtered': out[types.FILTERED]}
