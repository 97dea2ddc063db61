"""Stage d: link each mention to its best knowledge-base candidates.

Candidates C(m) of a mention m: `kb.lookup(m.text)`, every entity with an alias equal to the mention
once both are normalised (kb.normalize_alias: surface.py's folding); the `max_candidates` most
popular (by sitelinks, which the alias index holds) are decoded and scored.

Score of a candidate e of m, each term in [0, 1]:

  prior(e|m) = (s_e + 1) / sum_{c in C(m)} (s_c + 1)
               s = sitelink count (popularity), add-one smoothed, summed over all of C(m) before
               the cap; an unambiguous mention has prior 1.
  match(e|m) = q * k
               q = alias quality from the index: 1.0 if m is e's label, 0.8 if another alias;
               k = 1.0 if m's surface form equals e's label or alias exactly (case included),
                   0.9 if it matched only after case folding / normalisation.
  coh(e|m)   = mean over the other mentions m' (different normalised text, C(m') not empty) of
               max_{e' in C(m'), e' != e} J(W(e), W(e'))
               W(x) = content words of x's label and description: casefolded runs of >= 3
               letters minus a short stopword list; J = Jaccard |A & B| / |A | B| (0 if empty).
               Wikidata relations are not in the KB, so topical word overlap stands in for them:
               'Jaguar' next to 'Amazon rainforest' prefers the animal ("... of the Americas")
               over the car brand.

  score(e|m) = (w_p prior + w_m match + w_c coh) / (w_p + w_m + w_c)
               when no other mention has candidates coherence is undefined and drops out:
               score = (w_p prior + w_m match) / (w_p + w_m).

Each mention keeps its `top_k` best candidates (ties: more sitelinks, then the smaller Q-number)
whose score is >= min_score, for the CLIP selection to choose among (select.py); top_k=1 is the
text-only linker. Mentions with the same normalised text are linked once (the first). The pair's
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
               min_score=0.2, max_candidates=32, top_k=3):
    weights = dict(prior_weight=prior_weight, match_weight=match_weight,
                   coherence_weight=coherence_weight)
    bad = {k: v for k, v in weights.items() if v < 0}
    if bad or prior_weight + match_weight <= 0:
      raise ValueError(f'link weights must be >= 0 and prior_weight + match_weight > 0, got '
                       f'{weights}')
    if not 0 <= min_score <= 1:
      raise ValueError(f'link.min_score must be in [0, 1], got {min_score}')
    if max_candidates < 1 or top_k < 1:
      raise ValueError(f'link.max_candidates and link.top_k must be >= 1, got '
                       f'{max_candidates}, {top_k}')
    self._kb, self._top_k = kb, top_k
    self._wp, self._wm, self._wc = prior_weight, match_weight, coherence_weight
    self._min, self._max_candidates = min_score, max_candidates
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
    hits = self._kb.lookup(mention.text)            # most sitelinks first
    total = self._kb.alias_mass(mention.text)       # over all, the build's dropped ones too
    out = []
    for hit in hits[:self._max_candidates]:
      entity = self._kb.entity(hit.entity_id)
      exact = mention.text == entity.label or mention.text in entity.aliases
      out.append((entity, (hit.sitelinks + 1) / total,
                  hit.quality * (1.0 if exact else CASE_MISMATCH)))
    return out

  def _coherence(self, entity, others):
    """Mean over other mentions of the best word overlap with one of their candidates."""
    words = self._entity_words(entity.id)
    best = [max((jaccard(words, self._entity_words(o.id)) for o, _, _ in cands
                 if o.id != entity.id), default=0.0) for cands in others]
    return sum(best) / len(best)

  def score(self, mentions):
    """[(mention, [(Entity, score), ...]), ...] for the mentions with candidates."""
    per_mention = [(m, kb_lib.normalize_alias(m.text), self._candidates(m)) for m in mentions]
    per_mention = [x for x in per_mention if x[2]]
    out = []
    for mention, norm, cands in per_mention:
      others = [c for _, n2, c in per_mention if n2 != norm]
      scored = []
      for entity, prior, match in cands:
        if others and self._wc > 0:
          coh = self._coherence(entity, others)
          score = (self._wp * prior + self._wm * match + self._wc * coh) / (
              self._wp + self._wm + self._wc)
        else:
          score = (self._wp * prior + self._wm * match) / (self._wp + self._wm)
        scored.append((entity, score))
      out.append((mention, scored))
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
      kept = [types.Candidate(e.id, mention, float(score))
              for e, score in ranked[:self._top_k] if score >= self._min]
      if kept:
        groups.append(kept)
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
               min_score=0.2, max_candidates=32, top_k=3):
    super().__init__()
    self._settings = dict(prior_weight=prior_weight, match_weight=match_weight,
                          coherence_weight=coherence_weight, min_score=min_score,
                          max_candidates=max_candidates, top_k=top_k)
    EntityLinker(None, **self._settings)   # validates the settings here, not on a worker
    kb_lib.check_kb_dir(kb_dir)
    self._kb_dir = kb_dir

  def expand(self, pairs):
    out = (pairs | 'Link' >> beam.ParDo(_LinkFn(self._kb_dir, self._settings))
           .with_outputs(types.DEAD_LETTER, types.FILTERED, main='main'))
    return {'main': out.main, 'dead_letter': out[types.DEAD_LETTER],
            'filtered': out[types.FILTERED]}
