"""The elements that flow between the I2E stages, and the dead-letter record.

Stages pass plain frozen dataclasses (picklable, cheap to compare in tests):

  ReadPairs  -> Pair                (bad shards/records -> DeadLetter)
  CleanPairs -> Pair                (text normalised; duplicate images -> DeadLetter/filtered)
  FindMentions -> MentionedPair     (Pair + mention spans)
  LinkEntities -> LinkedPair        (Pair + each mention's top-k candidates, link scores)
  SelectWithClip -> SelectedPair    (Pair + kept entities with CLIP scores, and per mention
                                     the candidates CLIP chose among: MentionChoice)
  global passes / write             (class indices, shards, stats.json)

Every stage that can reject a record emits a `DeadLetter` (malformed input) or a
`Filtered` (well-formed but dropped by a rule, e.g. no entity survived) on a tagged
output, so that: inputs = written + sum(filtered by reason) + sum(dead-lettered by reason).
"""
import dataclasses
from typing import Optional, Tuple

# Tagged-output names used by every DoFn with side outputs.
DEAD_LETTER = 'dead_letter'
FILTERED = 'filtered'


@dataclasses.dataclass(frozen=True)
class Pair:
  key: str            # unique id (web-dataset key, parquet row key, ...); dedup by content hash later
  image: bytes        # encoded image bytes, as read
  text: str           # alt-text (UTF-8 decoded)
  source: str = ''    # shard path it came from, for error messages
  url: str = ''       # where the image was downloaded from (img2dataset's `url`), if known


@dataclasses.dataclass(frozen=True)
class Mention:
  start: int          # character offsets into Pair.text
  end: int
  text: str
  origin: str         # 'ner:<label>' (spaCy statistical NER) or 'kb' (alias PhraseMatcher)


@dataclasses.dataclass(frozen=True)
class MentionedPair:
  pair: Pair
  mentions: Tuple[Mention, ...]


@dataclasses.dataclass(frozen=True)
class Candidate:
  entity_id: str      # Wikidata Q-id
  mention: Mention
  link_score: float   # disambiguation score in [0, 1]


@dataclasses.dataclass(frozen=True)
class LinkedPair:
  pair: Pair
  # Per mention, its top-k candidates best first; mentions ordered by their best score.
  candidates: Tuple[Candidate, ...]


@dataclasses.dataclass(frozen=True)
class MentionChoice:
  """How selection decided one mention: its candidates and the scores it chose by."""
  mention: str                        # the mention's text
  entity_ids: Tuple[str, ...]         # its candidates, in link order (best link score first)
  link_scores: Tuple[float, ...]
  clip_scores: Tuple[float, ...]      # CLIP score c of each: cosine - text bias (select.py)
  chosen: int                         # index of the candidate kept, -1 if below threshold
  text_bias: Tuple[float, ...] = ()   # each text's mean cosine with the reference images


@dataclasses.dataclass(frozen=True)
class SelectedPair:
  pair: Pair
  entity_ids: Tuple[str, ...]         # kept entities, best CLIP score first
  scores: Tuple[float, ...]           # image-entity CLIP similarity, same order
  choices: Tuple[MentionChoice, ...] = ()   # per mention (empty for a pairs corpus)


@dataclasses.dataclass(frozen=True)
class DeadLetter:
  stage: str          # 'read', 'clean', 'mentions', 'link', 'select', 'write'
  reason: str         # short machine-countable reason, e.g. 'corrupt_image', 'not_utf8'
  key: str            # record key ('' when unknown, e.g. an unreadable shard)
  source: str         # file it came from
  detail: str = ''    # human-readable explanation (exception text, truncated)
  count: int = 1      # records it stands for (an unreadable shard may stand for many; 1 if unknown)


@dataclasses.dataclass(frozen=True)
class Filtered:
  stage: str
  reason: str         # e.g. 'duplicate_image', 'no_mention', 'no_candidate', 'below_threshold',
                      # 'rare_entity_only', 'near_duplicate_of_eval'
  key: str
  count: int = 1      # records it stands for (dedup.py counts the copies of one image at once)


@dataclasses.dataclass(frozen=True)
class Entity:
  id: str             # Q-number
  label: str
  description: str
  aliases: Tuple[str, ...]
  sitelinks: int      # popularity prior


@dataclasses.dataclass(frozen=True)
class AliasHit:
  entity_id: str
  quality: float      # 1.0 exact label, lower for aliases / case-folded matches
  alias: Optional[str] = None
  sitelinks: int = 0  # the entity's, stored in the alias index (candidates sort without decoding)
