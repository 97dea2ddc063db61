"""Accuracy of the model's own head on a labelled split: the eval of a fine-tuned model
(configs/transfer.py), whose head's class i is class i of that dataset.

Config (evals.<name>, type='classifier'): dataset, data_dir, test_split (default: the
dataset's test split; a folder is split by image index, see image_folder.py),
train_per_category (folder), batch_size, resize, preprocess. Reports top-1/top-5 as
`top1`/`top5` and `acc1`/`acc5`, and `mean_per_class_recall` (zeroshot.classification_metrics).
"""
import numpy as np

from mofi_jax.data import eval_transform
from mofi_jax.evals import datasets, embedding
from mofi_jax.evals.zeroshot import classification_metrics


class Evaluator:
  """Top-1/top-5 of the entity head's scores on the test split."""
  needs_text = False

  def __init__(self, cfg, *, image_size):
    self.test = datasets.open_from_config(cfg, 'test_split', need_names=False)
    self.transform = eval_transform.EvalTransform.from_config(cfg, image_size)
    self.batch_size = int(cfg.get('batch_size', 256))
    self.info = dict(dataset=cfg.get('dataset'), test_split=self.test.split,
                     **self.transform.info())

  def run(self, towers):
    if towers.classify_images is None:
      raise ValueError('classifier: the model has no head (mode contrastive); use knn, '
                       'linear_probe or zeroshot.')
    classes = len(self.test.class_names)

    def classify(images):   # refuses at the first batch, not after scoring the whole split
      scores = towers.classify_images(images)
      if scores.shape[1] != classes:
        raise ValueError(f'classifier: the head has {scores.shape[1]} classes, but '
                         f'{self.info["dataset"]} has {classes}.')
      return scores
    scores, labels = embedding.embed_labelled(
        classify, self.test.batches(self.transform, self.batch_size), self.batch_size)
    metrics = classification_metrics(np.asarray(scores), labels, classes)
    metrics.update(num_examples=len(labels))
    return metrics
