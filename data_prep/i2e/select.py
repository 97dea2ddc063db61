"""Stage e: CLIP chooses, per mention, which linked candidate the image shows, and keeps it.

Each mention m of a pair comes with its top-k candidates C(m) from the linker (link.py), each
with a link score l(e|m) in [0, 1]. CLIP scores every candidate's text against the image:

  c(e, x) = cos(x, t_e) - b(e),    b(e) = mean_{r in R} cos(r, t_e)

cos being the cosine of the image and text embeddings, t_e the text
`template.format(name=label, description=description)` (the training pipeline's entity
template, so the bootstrap CLIP scores the texts the spine will train on), and R the
reference images: the `reference_images` input pairs with the smallest sha256(key), embedded
once (a deterministic sample, whatever the runner). b(e) is the text's similarity to an
average image: a text the CLIP never learnt to place (a place name seen only in unrelated
alt-texts, 'a photographer') can sit close to every image, and would pass any threshold on
the raw cosine (the hubness that CSLS corrects in cross-modal retrieval). reference_images=0
gives b = 0, the raw cosine. Per mention, the choice combines c and the link score:

  e*(m) = argmax_{e in C(m)}  c(e, x) + link_weight * l(e|m)      (ties: the better-linked)

and m keeps e*(m) if c(e*(m), x) >= threshold: CLIP picks the sense the image shows (Paris the
city or Paris of Troy), the link score breaks near-ties in CLIP, and the threshold keeps its
meaning of "the image matches this entity's text". With link_weight = 0 CLIP alone chooses;
with the linker's top_k = 1 this is the text-only linker followed by the CLIP threshold. An
entity chosen by several mentions is kept once with its best c; the kept entities are ordered
best first (ties by id), at most top_k (0 = all), their c recorded in the SelectedPair with,
per mention, a MentionChoice (candidates, link and CLIP scores, the choice). A pair left with
none leaves as filtered 'below_threshold'.

The model runs through Beam's RunInference with `ClipModelHandler`, so it loads once per worker
process and sees batches of `batch_size` pairs. It is any `mofi_jax.inference.Encoder`:
  clip=dict(workdir=W)   the project's Flax CLIP, `inference.load(W)` (contrastive/multitask run)
  clip=dict(hf_clip=F)   a Hugging Face CLIP folder, `mofi_jax.interop.hf_import.load_encoder(F)`.
The loaded model keeps an LRU cache of entity text embeddings (an entity appears in many images).

Bad records: an image the encoder cannot decode is dead-lettered ('undecodable_image') and the
rest of its batch goes on; a candidate absent from the KB is dead-lettered ('unknown_entity').
"""
import collections
import dataclasses
import hashlib
import json
import threading
from typing import Optional, Tuple

import apache_beam as beam
import numpy as np
from apache_beam.io.filesystems import FileSystems
from apache_beam.ml.inference import base as inference_base

from data_prep.i2e import kb as kb_lib
from data_prep.i2e import types

STAGE = 'select'
DEFAULT_TEMPLATE = '{name}, {description}'


# ----------------------------------------------------------------------------- loading the model


def resolve_clip(clip):
  """A path or a {'workdir', 'hf_clip'} mapping -> dict(workdir=...) or dict(hf_clip=...).

  A path is told apart by its config.json: a HF folder's has 'model_type'/'architectures', a
  training workdir's has 'model' and 'input'. Raises ValueError naming the path otherwise.
  """
  if not clip:
    raise ValueError('select.clip is empty: give a training workdir or a HF CLIP folder.')
  if isinstance(clip, str):
    config = _read_json(clip, 'a training workdir or a HF CLIP folder')
    if 'model_type' in config or 'architectures' in config:
      return {'hf_clip': clip}
    if 'model' in config and 'input' in config:
      return {'workdir': clip}
    raise ValueError(f'select.clip={clip!r}: its config.json is neither a mofi_jax training '
                     "config ('model', 'input') nor a HF one ('model_type').")
  set_ = {k: v for k, v in dict(clip).items() if k in ('workdir', 'hf_clip') and v}
  if len(set_) != 1:
    raise ValueError(f'select.clip must set exactly one of workdir / hf_clip, got {dict(clip)}')
  (kind, path), = set_.items()
  _read_json(path, 'a mofi_jax training workdir (train.py writes config.json)'
             if kind == 'workdir' else 'a Hugging Face CLIP folder (config.json + weights)')
  return {kind: path}


def _read_json(folder, expected):
  path = FileSystems.join(folder, 'config.json')
  if not FileSystems.exists(path):
    raise ValueError(f'select.clip: {path} not found; expected {expected}.')
  with FileSystems.open(path) as f:
    try:
      config = json.loads(f.read().decode('utf-8'))
    except ValueError as e:   # UnicodeDecodeError is one too
      raise ValueError(f'select.clip: {path} is not valid JSON ({e}).') from e
  if not isinstance(config, dict):
    raise ValueError(f'select.clip: {path} must hold a JSON object, got '
                     f'{type(config).__name__}; expected {expected}.')
  return config


def load_encoder(clip):
  """The Encoder named by a resolved clip spec."""
  if 'workdir' in clip:
    from mofi_jax import inference  # pylint: disable=import-outside-toplevel
    return inference.load(clip['workdir'])
  try:
    from mofi_jax.interop import hf_import  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise ValueError(f'select.clip.hf_clip={clip["hf_clip"]!r}: the Hugging Face CLIP importer '
                     f'(mofi_jax.interop.hf_import) is not available here ({e}).') from e
  return hf_import.load_encoder(clip['hf_clip'])


class _EncoderLoader:
  """Picklable `() -> Encoder` for a resolved clip spec."""

  def __init__(self, clip):
    self.clip = clip

  def __call__(self):
    return load_encoder(self.clip)


# ----------------------------------------------------------------------------- scoring


@dataclasses.dataclass(frozen=True)
class ClipExample:
  """What RunInference sees: the linked pair and its candidates' texts (same order)."""
  linked: types.LinkedPair
  texts: Tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class ClipScores:
  scores: Optional[np.ndarray]   # cosine per text, float32 [K]; None when the image failed
  error: str = ''
  image: Optional[np.ndarray] = None   # the L2-normalised image embedding [D]
  texts: Optional[np.ndarray] = None   # the L2-normalised text embeddings [K, D]


# Every tower call sees exactly this many rows (zero/empty padded): one compiled shape, and
# per-row results that do not depend on how Beam happened to batch (byte-identical output).
_ROWS = 64
_BIAS_CACHE_SIZE = 100_000


def _bucket(n):
  """Rows a batch of n is padded to: a multiple of _ROWS (embedded _ROWS at a time)."""
  return max(1, -(-n // _ROWS)) * _ROWS


def _l2_normalize(x):
  x = np.asarray(x, np.float32)
  return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


class ClipModel:
  """An Encoder plus a per-worker LRU cache of text embeddings."""

  def __init__(self, encoder, text_cache_size=100_000):
    if not getattr(encoder, 'has_text', True):
      raise ValueError(f'{getattr(encoder, "source", "the CLIP model")}: a model without a text '
                       'tower cannot score entity texts (use a contrastive/multitask run).')
    self.encoder = encoder
    self._cache = collections.OrderedDict()
    self._cache_size = text_cache_size
    self._lock = threading.Lock()

  def text_embeddings(self, texts):
    """Distinct texts -> {text: L2-normalised embedding}, embedding only cache misses."""
    with self._lock:
      missing = [t for t in dict.fromkeys(texts) if t not in self._cache]
      if missing:
        padded = missing + [''] * (_bucket(len(missing)) - len(missing))
        for t, e in zip(missing, _l2_normalize(self.encoder.embed_texts(padded, batch_size=_ROWS))):
          self._cache[t] = e
      out = {}
      for t in texts:
        self._cache.move_to_end(t)
        out[t] = self._cache[t]
      while len(self._cache) > self._cache_size:
        self._cache.popitem(last=False)
      return out

  def image_embeddings(self, images):
    """list[bytes] -> (float32 [n_ok, D] normalised, list of per-image error or '')."""
    arrays, errors = [], []
    for image in images:
      try:
        arrays.append(self.encoder.preprocess([image])[0])
        errors.append('')
      except Exception as e:  # pylint: disable=broad-except
        errors.append(f'{type(e).__name__}: {" ".join(str(e).split())}'[:300])
    if not arrays:
      return np.zeros((0, 0), np.float32), errors
    x = np.stack(arrays)
    x = np.concatenate([x, np.zeros((_bucket(len(x)) - len(x),) + x.shape[1:], x.dtype)])
    return _l2_normalize(self.encoder.embed_images(x, batch_size=_ROWS)[:len(arrays)]), errors

  def score(self, examples):
    """ClipExamples -> ClipScores, one per example."""
    examples = list(examples)
    images, errors = self.image_embeddings([ex.linked.pair.image for ex in examples])
    texts = self.text_embeddings([t for ex in examples for t in ex.texts])
    out, row = [], 0
    for ex, err in zip(examples, errors):
      if err:
        out.append(ClipScores(None, err))
        continue
      t = np.stack([texts[x] for x in ex.texts]) if ex.texts else np.zeros((0, images.shape[1]))
      out.append(ClipScores((t @ images[row]).astype(np.float32), image=images[row], texts=t))
      row += 1
    return out


class ClipModelHandler(inference_base.ModelHandler):
  """RunInference handler: ClipExample -> PredictionResult(example, ClipScores).

  `loader` is a picklable `() -> Encoder`; by default it loads the model named by `clip`.
  """

  def __init__(self, clip=None, batch_size=64, loader=None, text_cache_size=100_000):
    super().__init__(min_batch_size=1, max_batch_size=batch_size)
    if loader is None:
      loader = _EncoderLoader(resolve_clip(clip))
    self._loader, self._text_cache_size = loader, text_cache_size

  def load_model(self):
    return ClipModel(self._loader(), self._text_cache_size)

  def run_inference(self, batch, model, inference_args=None):
    return [inference_base.PredictionResult(ex, s) for ex, s in zip(batch, model.score(batch))]

  def get_num_bytes(self, batch):
    return sum(len(ex.linked.pair.image) + sum(len(t) for t in ex.texts) for ex in batch)

  def get_metrics_namespace(self):
    return 'I2E_SelectWithClip'


# ----------------------------------------------------------------------------- the stage


class _ToExampleFn(beam.DoFn):
  """LinkedPair -> ClipExample with its entity texts | dead letter 'unknown_entity'."""

  def __init__(self, kb_dir, template):
    self._kb_dir, self._template = kb_dir, template
    self._kb = None

  def setup(self):
    self._kb = kb_lib.load_cached(self._kb_dir)

  def process(self, lp):
    texts = []
    for c in lp.candidates:
      if c.entity_id not in self._kb:
        yield beam.pvalue.TaggedOutput(types.DEAD_LETTER, types.DeadLetter(
            STAGE, 'unknown_entity', lp.pair.key, lp.pair.source,
            f'candidate {c.entity_id} is not in the KB {self._kb_dir}'))
        return
      e = self._kb.entity(c.entity_id)
      texts.append(self._template.format(name=e.label, description=e.description))
    yield ClipExample(lp, tuple(texts))


def mention_groups(candidates):
  """Indices of `candidates` grouped by mention, in order of first appearance."""
  groups = {}
  for i, c in enumerate(candidates):
    groups.setdefault(c.mention, []).append(i)
  return list(groups.values())


def text_bias(reference, text_embeddings):
  """b(e) of each text: its mean cosine with the reference images [N, D] (0 without any)."""
  if reference is None or not len(reference) or not len(text_embeddings):
    return np.zeros(len(text_embeddings))
  return (np.asarray(reference, np.float64) @ np.asarray(text_embeddings, np.float64).T).mean(0)


def choose(candidates, clip_scores, threshold, link_weight, bias=None):
  """Candidates, their CLIP cosines and text biases -> one MentionChoice per mention, the
  scores c = cosine - bias (module docstring)."""
  bias = np.zeros(len(candidates)) if bias is None else bias
  out = []
  for group in mention_groups(candidates):
    clip = [float(clip_scores[i]) - float(bias[i]) for i in group]
    link = [candidates[i].link_score for i in group]
    best = max(range(len(group)), key=lambda j: (clip[j] + link_weight * link[j], link[j], -j))
    out.append(types.MentionChoice(
        candidates[group[0]].mention.text, tuple(candidates[i].entity_id for i in group),
        tuple(link), tuple(clip), best if clip[best] >= threshold else -1,
        tuple(float(bias[i]) for i in group)))
  return tuple(out)


def keep_entities(choices, top_k):
  """(ids, CLIP scores) of the chosen entities: once each with its best score, best first
  (ties by id), at most top_k (0 = all)."""
  best = {}
  for ch in choices:
    if ch.chosen >= 0:
      e, score = ch.entity_ids[ch.chosen], ch.clip_scores[ch.chosen]
      best[e] = max(score, best.get(e, score))
  kept = sorted(best.items(), key=lambda es: (-es[1], es[0]))
  kept = kept[:top_k] if top_k else kept
  return tuple(e for e, _ in kept), tuple(s for _, s in kept)


class _KeepFn(beam.DoFn):
  def __init__(self, threshold, top_k, link_weight):
    self._threshold, self._top_k, self._link_weight = threshold, top_k, link_weight
    self._reference, self._bias = None, {}

  def _text_bias(self, reference, entity_ids, text_embeddings):
    """b(e) per candidate, computed once per entity on this worker (the reference is fixed)."""
    if reference is not self._reference:   # One side-input object per worker and run.
      self._reference, self._bias = reference, {}
    missing = [i for i, e in enumerate(entity_ids) if e not in self._bias]
    if missing:
      if len(self._bias) > _BIAS_CACHE_SIZE:
        self._bias.clear()
      for i, b in zip(missing, text_bias(reference, text_embeddings[missing])):
        self._bias[entity_ids[i]] = float(b)
    return np.array([self._bias[e] for e in entity_ids])

  def process(self, result, reference):
    lp, scores = result.example.linked, result.inference
    if scores.scores is None:
      yield beam.pvalue.TaggedOutput(types.DEAD_LETTER, types.DeadLetter(
          STAGE, 'undecodable_image', lp.pair.key, lp.pair.source, scores.error))
      return
    ids = [c.entity_id for c in lp.candidates]
    choices = choose(lp.candidates, scores.scores, self._threshold, self._link_weight,
                     self._text_bias(reference, ids, scores.texts))
    ids, kept = keep_entities(choices, self._top_k)
    if ids:
      yield types.SelectedPair(lp.pair, ids, kept, choices)
    else:
      yield beam.pvalue.TaggedOutput(types.FILTERED, types.Filtered(STAGE, 'below_threshold',
                                                                    lp.pair.key))


def default_threshold():
  """configs/i2e.py's select.threshold: the one place the default is stated (calibrate it for
  a CLIP model with data_prep/calibrate_select.py)."""
  from configs import i2e  # pylint: disable=import-outside-toplevel
  return i2e.get_config().select.threshold


class SelectWithClip(beam.PTransform):
  """LinkedPair -> {'main': SelectedPair, 'dead_letter': DeadLetter, 'filtered': Filtered}.

  clip: a training workdir / HF CLIP folder path, or dict(workdir=...) / dict(hf_clip=...);
  loader: optional picklable `() -> Encoder` used instead (tests, custom models).
  """

  def __init__(self, clip, kb_dir, template=DEFAULT_TEMPLATE, threshold=None, top_k=0,
               batch_size=64, link_weight=0.1, reference_images=1024, loader=None,
               text_cache_size=100_000):
    super().__init__()
    if top_k < 0 or batch_size < 1 or link_weight < 0 or reference_images < 0:
      raise ValueError(f'select: need top_k >= 0, batch_size >= 1, link_weight >= 0 and '
                       f'reference_images >= 0, got top_k={top_k}, batch_size={batch_size}, '
                       f'link_weight={link_weight}, reference_images={reference_images}')
    self._reference_images = reference_images
    try:
      template.format(name='n', description='d')
    except (KeyError, IndexError, ValueError) as e:
      raise ValueError(f'select.template {template!r} may only use {{name}} and '
                       f'{{description}} ({e!r}).') from e
    kb_lib.check_kb_dir(kb_dir)
    self._handler = ClipModelHandler(clip, batch_size, loader, text_cache_size)
    self._kb_dir, self._template = kb_dir, template
    self._threshold = default_threshold() if threshold is None else threshold
    self._top_k, self._link_weight = top_k, link_weight

  def expand(self, linked):
    examples = (linked | 'EntityTexts' >> beam.ParDo(_ToExampleFn(self._kb_dir, self._template))
                .with_outputs(types.DEAD_LETTER, main='main'))
    kept = (examples.main
            | 'Clip' >> inference_base.RunInference(self._handler)
            | 'Keep' >> beam.ParDo(_KeepFn(self._threshold, self._top_k, self._link_weight),
                                   beam.pvalue.AsSingleton(self._reference(linked)))
            .with_outputs(types.DEAD_LETTER, types.FILTERED, main='main'))
    dead = ((examples[types.DEAD_LETTER], kept[types.DEAD_LETTER])
            | 'AllDead' >> beam.Flatten())
    return {'main': kept.main, 'dead_letter': dead, 'filtered': kept[types.FILTERED]}

  def _reference(self, linked):
    """One element: the reference images' embeddings [N, D] in key-hash order, or None."""
    if not self._reference_images:
      return linked.pipeline | 'NoReference' >> beam.Create([None])
    return (linked
            | 'ReferenceSample' >> beam.combiners.Top.Smallest(self._reference_images,
                                                               key=_key_hash)
            | 'ReferenceExamples' >> beam.FlatMap(
                lambda lps: [ClipExample(types.LinkedPair(lp.pair, ()), ()) for lp in lps])
            | 'ReferenceClip' >> inference_base.RunInference(self._handler)
            | 'ReferenceEmbeddings' >> beam.FlatMap(_keyed_image_embedding)
            | 'AllReferences' >> beam.combiners.ToList()
            | 'Stack' >> beam.Map(_stack_by_key))


def _key_hash(lp):
  return hashlib.sha256(lp.pair.key.encode('utf-8')).digest()


def _keyed_image_embedding(result):
  if result.inference.image is not None:   # An undecodable image is no reference.
    yield _key_hash(result.example.linked), result.inference.image


def _stack_by_key(items):
  items = sorted(items, key=lambda kv: kv[0])
  return np.stack([v for _, v in items]) if items else None
