"""Stage d: link each mention to its best knowledge-base candidates.

Candidates C(m) of a mention m: `kb.lookup(m.text)`, every entity with an alias equal to the mention
once both are normalised (kb.normalize_alias: surface.py's folding); the `max_candidates` most
popular (by sitelinks, which the alias index holds) are decoded and scored.

Score of a candidate e of m, each term in [0, 1]:

  prior(e|m) = (s_e + 1) / (sum_{c in C(m)} (s_c + 1) + nil)
               s = sitelink count (popularity), add-one smoothed, summed over all of C(m) before
               the cap. `nil` (link.nil_sitelinks) is the mass of the reading "this name means
               no item of the KB here", so the prior is calibrated across mentions, not only
               among one mention's candidates: an unambiguous item with 100 sitelinks gets
               101/111 = 0.91, one with none 1/11 = 0.09 (nil = 10; Wikidata holds millions of
               items with no sitelink whose names are common words).
  match(e|m) = q * k
               q = alias quality from the index: 1.0 if m is e's label, 0.8 if another alias;
               k = 1.0 if m's surface form equals e's label or alias exactly (case included),
                   0.9 if it matched only after case folding / normalisation.
               match ranges over [m0, 1], m0 = 0.8 * 0.9 = 0.72 (every candidate matches).
  coh(e|m)   = mean over the other mentions m' (different normalised text, C(m') not empty) of
               max_{e' in C(m'), e' != e} J(W(e), W(e'))
               W(x) = content words of x's label and description: casefolded runs of >= 3
               letters minus a short stopword list; J = Jaccard |A & B| / |A | B| (0 if empty).
               Wikidata relations are not in the KB, so topical word overlap stands in for them:
               'Jaguar' next to 'Amazon rainforest' prefers the animal ("... of the Americas")
               over the car brand.

  score(e|m) = (w_p prior + w_m (match - m0) + w_c coh) / (w_p + w_m (1 - m0) + w_c)
               each term counted from its least value, so the score spans [0, 1] and
               `min_score` can reject; when no other mention has candidates coherence is
               undefined and drops out (w_c = 0 in both sums).

Within one mention the order is that of the weighted mean of prior, match and coherence; the
rescaling only gives the score a floor of 0. How nil_sitelinks and min_score were chosen, and
what they reject: docs/i2e.md ("A link score that can reject").

A mention whose best candidate scores below min_score is rejected; otherwise it keeps its
`top_k` best candidates (ties: more sitelinks, then the smaller Q-number), weak senses
included, for the CLIP selection to choose among (select.py): the sense an image shows is often
not the most popular one. top_k=1 is the text-only linker. Mentions with the same normalised text are linked once (the first). The pair's
candidates are grouped by mention, the mentions ordered by their best score (ties by Q-id). A
pair left with none leaves as filtered 'no_candidate'.
"""
import re
import threading

import apache_beam as beam

from data_prep.i2e import kb as kb_lib
from data_prep.i2e import types

STAGE = 'link'
CASE_MISMATCH = 0.9
MATCH_FLOOR = kb_lib.ALIAS_QUALITY * CASE_MISMATCH   # the least match(e|m): 0.72
_WORDS_CACHE_SIZE = 100_000
_WORD = re.compile(r'[^\W\d_]{3,}')
STOPWORDS = frozenset("""
  the and for with from into onto that this these those which who whom whose what when where
  are was were been being has had have not but its his her their our your than then also only
  such other some any all each more most very can may one two three about over under between
  after before during known like used""".split())


def content_words(text):
  return frozenset(w for w in _WORD.findall(text.casefold()) if w not in STOPWORDS)


def jaccard(a, b):
  union = len(a | b)
  return len(a & b) / union if union else 0.0


class EntityLinker:
  """Mentions -> Candidates (the stage's logic without Beam; also used by benchmarks)."""

  def __init__(self, kb, prior_weight=0.3, match_weight=0.4, coherence_weight=0.3,
               min_score=0.1, max_candidates=32, top_k=3, nil_sitelinks=10.0):
    weights = dict(prior_weight=prior_weight, match_weight=match_weight,
                   coherence_weight=coherence_weight)
    bad = {k: v for k, v in weights.items() if v < 0}
    if bad or prior_weight + match_weight <= 0:
      raise ValueError(f'link weights must be >= 0 and prior_weight + match_weight > 0, got '
                       f'{weights}')
    if not 0 <= min_score <= 1:
      raise ValueError(f'link.min_score must be in [0, 1], got {min_score}')
    if nil_sitelinks < 0:
      raise ValueError(f'link.nil_sitelinks must be >= 0, got {nil_sitelinks}')
    if max_candidates < 1 or top_k < 1:
      raise ValueError(f'link.max_candidates and link.top_k must be >= 1, got '
                       f'{max_candidates}, {top_k}')
    self._kb, self._top_k = kb, top_k
    self._wp, self._wm, self._wc = prior_weight, match_weight, coherence_weight
    self._min, self._max_candidates = min_score, max_candidates
    self._nil = float(nil_sitelinks)
    self._words = {}

  def _entity_words(self, qid):
    words = self._words.get(qid)
    if words is None:
      if len(self._words) >= _WORDS_CACHE_SIZE:
        self._words.clear()   # bounded: a worker meets millions of entities over a job
      e = self._kb.entity(qid)
      words = self._words[qid] = content_words(f'{e.label} {e.description}')
    return words

  def _candidates(self, mention):
    """[(entity, prior, match)] of one mention, most popular first, capped. The alias index
    holds each candidate's sitelinks, so the prior's total and the order need no entity
    decoded: only the `max_candidates` kept are ('John Smith' names thousands of items)."""
    # Most sitelinks first; the total is over all, the build's dropped ones too.
    hits, total = self._kb.lookup_with_mass(mention.text)
    out = []
    for hit in hits[:self._max_candidates]:
      entity = self._kb.entity(hit.entity_id)
      exact = mention.text == entity.label or mention.text in entity.aliases
      out.append((entity, (hit.sitelinks + 1) / (total + self._nil),
                  hit.quality * (1.0 if exact else CASE_MISMATCH)))
    return out

  def _coherence(self, entity, others):
    """Mean over other mentions of the best word overlap with one of their candidates."""
    words = self._entity_words(entity.id)
    best = [max((jaccard(words, self._entity_words(o.id)) for o, _, _ in cands
                 if o.id != entity.id), default=0.0) for cands in others]
    return sum(best) / len(best)

  def _score(self, prior, match, entity, others):
    """The module docstring's score(e|m): each term from its least value, over [0, 1]."""
    wc = self._wc if others else 0.0
    coh = self._coherence(entity, others) if wc > 0 else 0.0
    top = self._wp * prior + self._wm * (match - MATCH_FLOOR) + wc * coh
    return top / (self._wp + self._wm * (1 - MATCH_FLOOR) + wc)

  def score(self, mentions):
    """[(mention, [(Entity, score), ...]), ...] for the mentions with candidates."""
    per_mention = [(m, kb_lib.normalize_alias(m.text), self._candidates(m)) for m in mentions]
    per_mention = [x for x in per_mention if x[2]]
    out = []
    for mention, norm, cands in per_mention:
      others = [c for _, n2, c in per_mention if n2 != norm]
      out.append((mention, [(entity, self._score(prior, match, entity, others))
                            for entity, prior, match in cands]))
    return out

  def link(self, mentions):
    """tuple[Mention] -> tuple[Candidate]: per mention its top_k, grouped (module docstring)."""
    groups, seen = [], set()
    for mention, scored in self.score(mentions):
      norm = kb_lib.normalize_alias(mention.text)
      if norm in seen:
        continue
      seen.add(norm)
      ranked = sorted(scored, key=lambda s: (-s[1], -s[0].sitelinks,
                                             kb_lib.qid_number(s[0].id)))
      if ranked[0][1] >= self._min:
        groups.append([types.Candidate(e.id, mention, float(score))
                       for e, score in ranked[:self._top_k]])
    groups.sort(key=lambda g: (-g[0].link_score, kb_lib.qid_number(g[0].entity_id)))
    return tuple(c for g in groups for c in g)


_LINKERS = {}
_LINKERS_LOCK = threading.Lock()


def _cached_linker(kb_dir, **settings):
  key = (kb_dir,) + tuple(sorted(settings.items()))
  with _LINKERS_LOCK:
    if key not in _LINKERS:
      _LINKERS[key] = EntityLinker(kb_lib.load_cached(kb_dir), **settings)
    return _LINKERS[key]


class _LinkFn(beam.DoFn):
  """MentionedPair -> LinkedPair | filtered 'no_candidate' | dead letter 'link_error'."""

  def __init__(self, kb_dir, settings):
    self._kb_dir, self._settings = kb_dir, settings
    self._linker = None

  def setup(self):
    self._linker = _cached_linker(self._kb_dir, **self._settings)

  def process(self, mp):
    try:
      candidates = self._linker.link(mp.mentions)
    except Exception as e:  # pylint: disable=broad-except
      yield beam.pvalue.TaggedOutput(types.DEAD_LETTER, types.DeadLetter(
          STAGE, 'link_error', mp.pair.key, mp.pair.source, f'{type(e).__name__}: {e}'[:300]))
      return
    if candidates:
      yield types.LinkedPair(mp.pair, candidates)
    else:
      yield beam.pvalue.TaggedOutput(types.FILTERED, types.Filtered(STAGE, 'no_candidate',
                                                                    mp.pair.key))


class LinkEntities(beam.PTransform):
  """MentionedPair -> {'main': LinkedPair, 'dead_letter': DeadLetter, 'filtered': Filtered}."""

  def __init__(self, kb_dir, prior_weight=0.3, match_weight=0.4, coherence_weight=0.3,
               min_score=0.1, max_candidates=32, top_k=3, nil_sitelinks=10.0):
    super().__init__()
    self._settings = dict(prior_weight=prior_weight, match_weight=match_weight,
                          coherence_weight=coherence_weight, min_score=min_score,
                          max_candidates=max_candidates, top_k=top_k,
                          nil_sitelinks=nil_sitelinks)
    EntityLinker(None, **self._settings)   # validates the settings here, not on a worker
    kb_lib.check_kb_dir(kb_dir)
    self._kb_dir = kb_dir

  def expand(self, pairs):
    out = (pairs | 'Link' >> beam.ParDo(_LinkFn(self._kb_dir, self._settings))
           .with_outputs(types.DEAD_LETTER, types.FILTERED, main='main'))
    return {'main': out.main, 'dead_letter': out[types.DEAD_LETTER],
            'filtered': out[types.FILTERED]}
