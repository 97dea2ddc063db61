"""A caption world in which common words are entity aliases, as they are in Wikidata.

Wikidata has items labelled 'Sunset' (a film), 'Apple' (the company), 'Rain' (a singer),
'Orange', 'Shell' and 'Target' (companies) and 'The Who' (a band). An alias matcher finds
them in 'sunset over the lake' and 'a red apple on a table', where nothing is named. This
module writes such a knowledge base and alt-texts with their ground truth, so that the NER
gate of mentions.py can be measured (tests/test_i2e_ner.py, benchmarks/ner_gate.py):

  kb_entities()                  the KB: landmark/place/person names + common-word entities
  captions(n, seed)              [Caption(text, true_spans)]: the character spans that name
                                 an entity; every other alias hit is a false mention
  score(finder, captions)        a mention finder's false mentions and recall against them

Captions mix the cases web alt-texts come in: sentence case, sentence case starting in lower
case, all lower case and Title Case.
The common words appear both as words ('fresh orange juice', 'Sunset over Rome') and as
names ('the Apple store in Tokyo', 'The Who live in London').
"""
import dataclasses
import random
from typing import Tuple

from data_prep.i2e import types

PLACES = ('Eiffel Tower', 'Paris', 'Tokyo', 'London', 'Golden Gate Bridge', 'San Francisco',
          'Mount Fuji', 'Taj Mahal', 'Big Ben', 'Central Park', 'New York City',
          'Sydney Opera House', 'Colosseum', 'Rome', 'Barcelona', 'Berlin', 'Kyoto', 'Venice',
          'Cupertino', 'Seoul', 'Wembley Stadium', 'Lake Geneva')
PEOPLE = ('Lionel Messi', 'Taylor Swift', 'Barack Obama', 'Serena Williams', 'Roger Federer')
# alias -> (description, its uses as a word, its uses as a name); {P} is a place.
COMMON = {
    'Sunset': ('1988 film by Blake Edwards',
               ('{a} sunset over {P}', 'sunset on the beach', 'watching the sunset from {P}',
                'sunset sky with clouds', 'Sunset over {P}', 'Sunset at the lake'),
               ('poster of the film Sunset', 'Bruce Willis in Sunset', 'a scene from Sunset')),
    'Apple': ('American technology company',
              ('a red apple on a table', 'apple pie with cream', 'fresh apple juice',
               'Apple pie with cream', 'Apple tree in the garden', 'green apple slices'),
              ('the Apple store in {P}', 'new iPhone from Apple', 'Apple store in {P}',
               'Apple headquarters in {P}', 'a laptop made by Apple')),
    'Rain': ('South Korean singer and actor',
             ('rain on the window', 'walking in the rain in {P}', 'Rain in {P}',
              'heavy rain over {P}', 'Rain drops on a leaf'),
             ('K-pop star Rain on stage', 'singer Rain performing in {P}',
              'Rain performing in {P}')),
    'Orange': ('French telecommunications company',
               ('fresh orange juice', 'an orange on a plate', 'Orange slices on a plate',
                'orange leaves in autumn', 'Orange sky over {P}'),
               ('the Orange shop in {P}', 'Orange mobile network advert',
                'a phone contract from Orange')),
    'Shell': ('British oil and gas company',
              ('a sea shell on the sand', 'Shell collection on the beach',
               'shell of a snail'),
              ('a Shell petrol station in {P}', 'Shell headquarters in {P}',
               'Shell gas station at night')),
    'Target': ('American retail corporation',
               ('archery target at the range', 'Target practice in the park',
                'a dart in the target'),
               ('the Target store in {P}', 'shopping at Target', 'Target store in {P}')),
    'The Who': ('English rock band',
                (),
                ('The Who live in {P}', 'concert by The Who at {P}',
                 'The Who on stage in {P}', 'a poster of The Who')),
}
PROPER = ('{P} at night', 'view of the {P} from the river', 'tourists at {P}', '{P} skyline',
          'we visited {P} and {P}', 'the {P} in spring', '{H} visiting {P}',
          '{H} at a press conference', 'street photo of {P}', 'a postcard from {P}',
          'portrait of {H}', 'a photo of {H} in {P}', 'fans meet {H}')
ADJECTIVES = ('beautiful', 'golden', 'stormy', 'a')
CASES = (('sentence', 0.45), ('lower_start', 0.15), ('lower', 0.20), ('title', 0.20))


@dataclasses.dataclass(frozen=True)
class Caption:
  text: str
  true_spans: Tuple[Tuple[int, int], ...]   # character spans that name a KB entity


def kb_entities():
  """The KB: every place and person, and one entity per common-word alias."""
  names = [(n, 'place') for n in PLACES] + [(n, 'person') for n in PEOPLE]
  entities = [types.Entity(f'Q{100 + i}', n, f'a {kind}', (), 50) for i, (n, kind)
              in enumerate(names)]
  entities += [types.Entity(f'Q{900 + i}', alias, desc, (), 80) for i, (alias, (desc, _, _))
               in enumerate(sorted(COMMON.items()))]
  return entities


def _segments(template, named, rng):
  """Template -> [(text, is_name)]; `named` = the template's common word is a name."""
  out = []
  for i, part in enumerate(template.split('{')):
    if i:
      slot, part = part.split('}', 1)
      if slot == 'P':
        out.append((rng.choice(PLACES), True))
      elif slot == 'H':
        out.append((rng.choice(PEOPLE), True))
      else:
        out.append((rng.choice(ADJECTIVES), False))
    out.extend(_split_common(part, named))
  return out


def _split_common(text, named):
  """Marks a common alias inside literal template text as a name or a word."""
  for alias in sorted(COMMON, key=len, reverse=True):
    at = text.lower().find(alias.lower())
    if at >= 0 and _word_bounded(text, at, len(alias)):
      return ([(text[:at], False), (text[at:at + len(alias)], named)]
              + _split_common(text[at + len(alias):], named))
  return [(text, False)] if text else []


def _word_bounded(text, at, length):
  before = text[at - 1] if at else ' '
  after = text[at + length] if at + length < len(text) else ' '
  return not before.isalnum() and not after.isalnum()


def _cased(segments, case):
  if case == 'lower':
    return [(t.lower(), n) for t, n in segments]
  if case == 'title':
    return [(' '.join(w[:1].upper() + w[1:] for w in t.split(' ')), n) for t, n in segments]
  first, is_name = segments[0]
  start = first[:1].lower() if case == 'lower_start' else first[:1].upper()
  return [(start + first[1:], is_name)] + segments[1:]


def _caption(segments):
  text, spans = '', []
  for part, is_name in segments:
    if is_name:
      spans.append((len(text), len(text) + len(part)))
    text += part
  return Caption(text, tuple(spans))


def score(finder, captions_):
  """{false_per_100, false_share, recall} of `finder.find` against the true spans."""
  false = true = found = 0
  for caption, hits in zip(captions_, finder.find([c.text for c in captions_])):
    spans = {(m.start, m.end) for m in hits}
    found += len(spans)
    true += len(spans & set(caption.true_spans))
    false += len(spans - set(caption.true_spans))
  names = sum(len(c.true_spans) for c in captions_)
  return dict(false_per_100=100 * false / len(captions_), false_share=false / max(1, found),
              recall=true / names)


def captions(n, seed=0):
  """`n` captions: 40% proper names only, 35% common words as words, 25% as names."""
  rng = random.Random(seed)
  out = []
  for _ in range(n):
    u = rng.random()
    if u < 0.40:
      template, named = rng.choice(PROPER), False
    else:
      _, words, names = COMMON[rng.choice(sorted(COMMON))]
      named = u >= 0.75 or not words
      template = rng.choice(names if named else words)
    case = rng.choices([c for c, _ in CASES], [w for _, w in CASES])[0]
    out.append(_caption(_cased(_segments(template, named, rng), case)))
  return out
