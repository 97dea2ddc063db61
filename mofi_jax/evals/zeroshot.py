"""Zero-shot classification (CLIP's protocol): class names x prompt templates -> classifier.

Each class is embedded by the text tower under every template; the L2-normalised template
embeddings are averaged and re-normalised (templates.py lists CLIP's published sets). An
image is assigned the class of highest cosine similarity; we report top-1 and top-5 (also
as CLIP_benchmark's acc1/acc5) and the mean per-class recall.

Config (evals.<name>, type='zeroshot'): dataset ('folder' or a TFDS name), data_dir,
split (default: the split CLIP reports), templates (a set name or one '{}' template;
default per dataset), batch_size, text_batch_size, resize, name_key (folder only: the
categories.json field to use as class name).
"""
import numpy as np

from mofi_jax.data import eval_transform
from mofi_jax.evals import datasets, embedding, templates as templates_lib


def topk_accuracy(scores, labels, ks=(1, 5)):
  """{f'top{k}': fraction of rows whose label is among the k highest scores}.

  Ties go to the lower class index (as np.argmax and lax.top_k order them): the label's
  rank is the number of classes scoring higher, or equal with a lower index.
  """
  scores = np.asarray(scores)
  labels = np.asarray(labels)
  if scores.ndim != 2 or labels.shape != (scores.shape[0],):
    raise ValueError(f'Expected scores [N, C] and labels [N], got {scores.shape} and '
                     f'{labels.shape}.')
  if labels.size and (labels.min() < 0 or labels.max() >= scores.shape[1]):
    raise ValueError(f'Labels must be in [0, {scores.shape[1]}), got range '
                     f'[{labels.min()}, {labels.max()}].')
  own = scores[np.arange(len(labels)), labels]
  lower_index = np.arange(scores.shape[1])[None, :] < labels[:, None]
  rank = np.sum((scores > own[:, None]) | ((scores == own[:, None]) & lower_index), axis=1)
  return {f'top{k}': float(np.mean(rank < k)) for k in ks}


def classification_metrics(scores, labels, num_classes):
  """top-k accuracy (k = 1, and 5 when there are 5 classes or more, as in CLIP_benchmark)
  under our names (`top1`, `top5`) and CLIP_benchmark's (`acc1`, `acc5`), and its `mean_per_class_recall`:
  the top-1 recall of each class present in `labels`, averaged (scikit-learn's
  balanced_accuracy_score; top-1 ties go to the lower class index, as everywhere here)."""
  ks = (1, 5) if num_classes >= 5 else (1,)
  metrics = topk_accuracy(scores, labels, ks)
  metrics.update({f'acc{k}': metrics[f'top{k}'] for k in ks})
  labels = np.asarray(labels)
  hits = np.argmax(np.asarray(scores), axis=1) == labels
  support = np.bincount(labels, minlength=num_classes)
  present = support > 0
  recall = np.bincount(labels, weights=hits, minlength=num_classes)[present] / support[present]
  metrics['mean_per_class_recall'] = float(recall.mean()) if recall.size else 0.0
  return metrics


def zeroshot_scores(image_features, class_emb, block=4096):
  """Cosine similarities [N, C] of (re-normalised) image features to the class embeddings."""
  x = np.asarray(image_features, np.float32)
  x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
  return np.concatenate([x[i:i + block] @ class_emb.T for i in range(0, len(x), block)])


class Evaluator:
  """Zero-shot top-1/top-5 accuracy on one labelled split (see the module docstring)."""
  needs_text = True

  def __init__(self, cfg, *, image_size):
    self.source = datasets.open_from_config(cfg, 'split',
                                            name_key=cfg.get('name_key', 'description'))
    self.templates = templates_lib.resolve(cfg.get('templates'), cfg.get('dataset'))
    self.transform = eval_transform.EvalTransform.from_config(cfg, image_size)
    self.embed_args = (self.transform, int(cfg.get('batch_size', 256)))
    self.text_batch_size = int(cfg.get('text_batch_size', 256))
    self.info = dict(dataset=cfg.get('dataset'), split=self.source.split,
                     num_classes=len(self.source.class_names),
                     num_templates=len(self.templates), **self.transform.info())

  def run(self, towers):
    class_emb = embedding.class_embeddings(towers.embed_texts, self.source.class_names,
                                           self.templates, self.text_batch_size)
    features, labels = embedding.embed_source(towers, self.source, *self.embed_args)
    scores = zeroshot_scores(features, class_emb)
    num_classes = len(self.source.class_names)
    metrics = classification_metrics(scores, labels, num_classes)
    metrics.update(chance_top1=1.0 / num_classes, num_examples=len(labels))
    return metrics
