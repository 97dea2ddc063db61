"""Stage e: keep the linked entities that a CLIP model sees in the image.

Score of an entity for an image: cosine(image embedding, embedding of the entity's text), the text
being `template.format(name=label, description=description)` (the training pipeline's entity
template, so the bootstrap CLIP scores the texts the spine will train on). Entities with
score >= threshold are kept, best first, at most top_k (0 = all); their scores are recorded in the
SelectedPair. A pair left with none leaves as filtered 'below_threshold'.

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
      return json.loads(f.read().decode('utf-8'))
    except ValueError as e:
      raise ValueError(f'select.clip: {path} is not valid JSON ({e}).') from e


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


# Every tower call sees exactly this many rows (zero/empty padded): one compiled shape, and
# per-row results that do not depend on how Beam happened to batch (byte-identical output).
_ROWS = 64


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
      out.append(ClipScores((t @ images[row]).astype(np.float32)))
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


def keep_entities(entity_ids, scores, threshold, top_k):
  """(ids, scores) kept: score >= threshold, best first (ties by id), at most top_k (0 = all)."""
  kept = sorted(((float(s), e) for e, s in zip(entity_ids, scores) if s >= threshold),
                key=lambda x: (-x[0], x[1]))
  kept = kept[:top_k] if top_k else kept
  return tuple(e for _, e in kept), tuple(s for s, _ in kept)


class _KeepFn(beam.DoFn):
  def __init__(self, threshold, top_k):
    self._threshold, self._top_k = threshold, top_k

  def process(self, result):
    lp, scores = result.example.linked, result.inference
    if scores.scores is None:
      yield beam.pvalue.TaggedOutput(types.DEAD_LETTER, types.DeadLetter(
          STAGE, 'undecodable_image', lp.pair.key, lp.pair.source, scores.error))
      return
    ids, kept = keep_entities([c.entity_id for c in lp.candidates], scores.scores,
                              self._threshold, self._top_k)
    if ids:
      yield types.SelectedPair(lp.pair, ids, kept)
    else:
      yield beam.pvalue.TaggedOutput(types.FILTERED, types.Filtered(STAGE, 'below_threshold',
                                                                    lp.pair.key))


class SelectWithClip(beam.PTransform):
  """LinkedPair -> {'main': SelectedPair, 'dead_letter': DeadLetter, 'filtered': Filtered}.

  clip: a training workdir / HF CLIP folder path, or dict(workdir=...) / dict(hf_clip=...);
  loader: optional picklable `() -> Encoder` used instead (tests, custom models).
  """

  def __init__(self, clip, kb_dir, template=DEFAULT_TEMPLATE, threshold=0.2, top_k=0,
               batch_size=64, loader=None, text_cache_size=100_000):
    super().__init__()
    if top_k < 0 or batch_size < 1:
      raise ValueError(f'select: top_k must be >= 0 and batch_size >= 1, got top_k={top_k}, '
                       f'batch_size={batch_size}')
    try:
      template.format(name='n', description='d')
    except (KeyError, IndexError, ValueError) as e:
      raise ValueError(f'select.template {template!r} may only use {{name}} and '
                       f'{{description}} ({e!r}).') from e
    kb_lib.check_kb_dir(kb_dir)
    self._handler = ClipModelHandler(clip, batch_size, loader, text_cache_size)
    self._kb_dir, self._template = kb_dir, template
    self._threshold, self._top_k = threshold, top_k

  def expand(self, linked):
    examples = (linked | 'EntityTexts' >> beam.ParDo(_ToExampleFn(self._kb_dir, self._template))
                .with_outputs(types.DEAD_LETTER, main='main'))
    kept = (examples.main
            | 'Clip' >> inference_base.RunInference(self._handler)
            | 'Keep' >> beam.ParDo(_KeepFn(self._threshold, self._top_k))
            .with_outputs(types.DEAD_LETTER, types.FILTERED, main='main'))
    dead = ((examples[types.DEAD_LETTER], kept[types.DEAD_LETTER])
            | 'AllDead' >> beam.Flatten())
    return {'main': kept.main, 'dead_letter': dead, 'filtered': kept[types.FILTERED]}
