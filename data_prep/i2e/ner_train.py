"""A spaCy NER trained on alt-texts weakly labelled by the KB's aliases (data_prep/train_ner.py).

No pretrained pipeline can be installed everywhere (en_core_web_trf is a download), so the
project bootstraps one from what every I2E build has: the knowledge base and the alt-texts.
The alias matcher (mentions.MentionFinder) finds every hit; the labels come from how the
corpus writes each surface form:

  * a surface form is *common* if, where its case tells anything (not at the start of an
    alt-text, not in a Title Case or all-lower-case one), at least `common_share` (0.2) of
    its occurrences are in lower case, since names seldom are: 'sunset', 'apple', 'rain';
    not 'paris', 'the who';
  * a hit is ENTITY, unless its form is common and it is written in lower case (then it is
    outside any entity) or its case tells nothing (start of the text, Title Case: then the
    tokens are *missing*, and the model learns them from their context alone);
  * every other token is outside.

The NER learns from context and spelling where a common word names something ('the Apple
store', 'The Who live') and where it does not ('Apple pie', 'Sunset over Rome'). It is
trained with spaCy's own config system (`spacy init config --pipeline ner`, CPU efficiency
preset) and `spacy train`, on 90% of the labelled texts and their sentence-case copies
(`case_variants`), choosing the best epoch on the rest.
"""
import dataclasses
import random
import tempfile

from apache_beam.io.filesystems import FileSystems

from data_prep.i2e import kb as kb_lib
from data_prep.i2e import mentions as mentions_lib
from data_prep.i2e import read, types

LABEL = 'ENTITY'


@dataclasses.dataclass(frozen=True)
class Labelled:
  text: str
  entities: tuple   # (start, end) character spans labelled ENTITY
  missing: tuple    # (start, end) character spans whose tokens have no label


def read_texts(patterns, read_config, limit=0):
  """The alt-texts of the pair files matching `patterns`, in file order; `limit` 0 = all.

  Raises ValueError naming the pattern if it matches no file.
  """
  reader = read.ReadPairs(patterns, **read_config).read_fn
  texts = []
  for pattern in patterns:
    paths = sorted(m.path for m in FileSystems.match([pattern])[0].metadata_list)
    if not paths:
      raise ValueError(f'--pairs {pattern!r} matched no file')
    for path in paths:
      if read.shard_format(path) is None:
        raise ValueError(f'{path}: not a pair file (expected *.tar, *.parquet, *.tfrecord)')
      for _, item in reader.records(path):
        if isinstance(item, types.Pair) and item.text.strip():
          texts.append(item.text)
          if limit and len(texts) >= limit:
            return texts
  return texts


def _title_case(text, hits):
  """True if the words outside `hits` (3+ letters) all start upper-case, and there are 2+."""
  outside = list(text)
  for m in hits:
    outside[m.start:m.end] = ' ' * (m.end - m.start)
  words = [w for w in ''.join(outside).split() if len(w) >= 3 and w[0].isalpha()]
  return len(words) >= 2 and all(w[0].isupper() for w in words)


def _case(text, hit, title):
  """'lower' | 'upper' (capitalised where case tells) | 'unknown'."""
  if hit.text == hit.text.lower():
    return 'lower' if text != text.lower() else 'unknown'
  if title or not text[:hit.start].strip():
    return 'unknown'
  return 'upper'


def weak_labels(texts, kb, common_share=0.2):
  """-> ([Labelled], the set of common surface forms)."""
  finder = mentions_lib.MentionFinder(kb, max_mentions=0, case_rules=False)
  found = finder.find(texts)
  cased = []
  counts = {}
  for text, hits in zip(texts, found):
    title = _title_case(text, hits)
    cases = [(kb_lib.normalize_alias(h.text), _case(text, h, title)) for h in hits]
    for form, case in cases:
      lower, upper = counts.get(form, (0, 0))
      counts[form] = (lower + (case == 'lower'), upper + (case == 'upper'))
    cased.append(cases)
  common = {f for f, (lower, upper) in counts.items()
            if lower + upper and lower >= common_share * (lower + upper)}
  labelled = []
  for text, hits, cases in zip(texts, found, cased):
    entities, missing = [], []
    for hit, (form, case) in zip(hits, cases):
      if form not in common or case == 'upper':
        entities.append((hit.start, hit.end))
      elif case == 'unknown':
        missing.append((hit.start, hit.end))
    labelled.append(Labelled(text, tuple(entities), tuple(missing)))
  return labelled, common


def case_variants(labelled):
  """Each fully labelled text that starts in lower case again in sentence case, same labels.

  The web writes 'sunset over Paris' and 'Sunset over Paris' alike, and what the first word
  names does not change; the copy teaches the model the case that tells nothing on its own.
  """
  out = []
  for example in labelled:
    text = example.text[:1].upper() + example.text[1:]
    if not example.missing and text != example.text and len(text) == len(example.text):
      out.append(dataclasses.replace(example, text=text))
  return out


def _doc(nlp, example):
  doc = nlp.make_doc(example.text)
  spans = [doc.char_span(s, e, label=LABEL, alignment_mode='expand')
           for s, e in example.entities]
  missing = [doc.char_span(s, e, alignment_mode='expand') for s, e in example.missing]
  doc.set_ents([s for s in spans if s is not None],
               missing=[s for s in missing if s is not None], default='outside')
  return doc


def _write_docbin(nlp, examples, path):
  from spacy.tokens import DocBin  # pylint: disable=import-outside-toplevel
  DocBin(docs=[_doc(nlp, e) for e in examples]).to_disk(path)


def train(labelled, out_dir, epochs=10, seed=0, dev_share=0.1, meta=None):
  """Trains the NER with `spacy train`; writes the best pipeline to `out_dir` (local path),
  with `meta` added to its meta.json.

  Returns the dev-set scores of the saved pipeline (on the weak labels).
  """
  import spacy  # pylint: disable=import-outside-toplevel
  from spacy.cli.init_config import init_config  # pylint: disable=import-outside-toplevel
  from spacy.cli.train import train as spacy_train  # pylint: disable=import-outside-toplevel
  if len(labelled) < 20:
    raise ValueError(f'train_ner: {len(labelled)} alt-texts; at least 20 are needed')
  if not any(e.entities for e in labelled):
    raise ValueError('train_ner: no alt-text holds a KB alias; nothing to learn from')
  order = list(labelled)
  random.Random(seed).shuffle(order)
  n_dev = max(1, int(len(order) * dev_share))
  nlp = spacy.blank('en')
  with tempfile.TemporaryDirectory(prefix='train_ner-') as work:
    train_set = order[n_dev:] + case_variants(order[n_dev:])
    _write_docbin(nlp, train_set, f'{work}/train.spacy')
    _write_docbin(nlp, order[:n_dev], f'{work}/dev.spacy')
    config = init_config(lang='en', pipeline=['ner'], optimize='efficiency')
    config.to_disk(f'{work}/config.cfg')
    spacy_train(f'{work}/config.cfg', f'{work}/out', overrides={
        'paths.train': f'{work}/train.spacy', 'paths.dev': f'{work}/dev.spacy',
        'training.max_epochs': epochs, 'training.max_steps': 0, 'training.seed': seed,
        'system.seed': seed, 'training.patience': 0})
    best = spacy.load(f'{work}/out/model-best')
    best.meta.update(meta or {})
    best.to_disk(out_dir)
    return dict(best.meta.get('performance', {}))
