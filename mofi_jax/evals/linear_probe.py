"""Linear probe: multinomial logistic regression on frozen features, CLIP's protocol.

Objective (scikit-learn's LogisticRegression with C = 1 / l2, so results are comparable):
  sum_i CE(x_i W + b, y_i) + l2 / 2 * ||W||^2      (the bias is not penalised),
minimised full-batch with L-BFGS (optax.lbfgs, zoom line search) in float32, inside one
jitted while_loop; we minimise it divided by the number of examples, which has the same
minimiser and keeps gradients O(1).

L2 strength, as in CLIP (Radford et al. 2021, appendix A.3): a parametric binary search
over log10(l2) in [-6, 6] on a validation split, starting from 10^-6, 10^-4, ..., 10^6 and
halving the step around the best value until 8 steps per decade; validation accuracy
decides, validation log-loss breaks ties. The probe is then refit on train + validation
with the chosen l2 and scored on the test split. Where a dataset has no validation split
we hold one out of train (stratified `val_fraction`, seed 0).

Config (evals.<name>, type='linear_probe'): dataset, data_dir, train_split, val_split
(default: held out of train), test_split, val_fraction (0.2), train_per_category (folder),
max_iter (1000, CLIP's), batch_size, resize.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mofi_jax.data import eval_transform
from mofi_jax.evals import datasets, embedding
from mofi_jax.evals.zeroshot import classification_metrics, topk_accuracy

LOG10_L2_RANGE = (-6.0, 6.0)
FINAL_STEPS_PER_DECADE = 8


def _objective(params, x, onehot, weights, l2):
  logits = x @ params['w'] + params['b']
  xent = -jnp.sum(onehot * jax.nn.log_softmax(logits), axis=1)
  n = jnp.sum(weights)
  return (jnp.sum(weights * xent) + 0.5 * l2 * jnp.sum(params['w'] ** 2)) / n


@functools.partial(jax.jit, static_argnames=('num_classes', 'max_iter'))
def _fit(x, labels, weights, l2, *, num_classes, max_iter, gtol):
  """L-BFGS on the objective; rows with weight 0 are ignored (one shape for all fits)."""
  onehot = jax.nn.one_hot(labels, num_classes, dtype=x.dtype)
  fun = lambda p: _objective(p, x, onehot, weights, l2)
  solver = optax.lbfgs()
  value_and_grad = optax.value_and_grad_from_state(fun)
  params = {'w': jnp.zeros((x.shape[1], num_classes), x.dtype),
            'b': jnp.zeros(num_classes, x.dtype)}

  def step(carry):
    params, state, it, _, prev_value = carry
    value, grad = value_and_grad(params, state=state)
    updates, state = solver.update(grad, state, params, value=value, grad=grad, value_fn=fun)
    gnorm = optax.tree.norm(grad, ord='inf')
    return optax.apply_updates(params, updates), state, it + 1, gnorm, value

  def keep_going(carry):
    _, state, it, gnorm, prev_value = carry
    value = optax.tree_utils.tree_get(state, 'value')
    # Stop at max_iter, at a small gradient, or once float32 makes no more progress.
    stalled = (it > 1) & (prev_value - value <= 1e-7 * jnp.abs(value))
    return (it < max_iter) & (gnorm > gtol) & ~stalled

  init = (params, solver.init(params), 0, jnp.inf, jnp.inf)
  params, _, iterations, _, _ = jax.lax.while_loop(keep_going, step, init)
  return params, iterations


def fit(features, labels, num_classes, l2, *, weights=None, max_iter=1000, gtol=1e-6):
  """(W [D, C], b [C], iterations) of the L2-regularised logistic regression."""
  x = jnp.asarray(features, jnp.float32)
  weights = np.ones(len(x), np.float32) if weights is None else np.asarray(weights, np.float32)
  params, iterations = _fit(x, jnp.asarray(labels, jnp.int32), jnp.asarray(weights),
                            jnp.float32(l2), num_classes=int(num_classes),
                            max_iter=int(max_iter), gtol=float(gtol))
  return np.asarray(params['w']), np.asarray(params['b']), int(iterations)


def log_loss(logits, labels):
  logits = np.asarray(logits, np.float64)
  shifted = logits - logits.max(axis=1, keepdims=True)
  log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
  return float(-np.mean(log_probs[np.arange(len(labels)), labels]))


def search_l2(score_fn, lo=LOG10_L2_RANGE[0], hi=LOG10_L2_RANGE[1], first_step=2.0,
              steps_per_decade=FINAL_STEPS_PER_DECADE):
  """CLIP's parametric binary search over log10(l2): (best log10 l2, {log10 l2: score}).

  score_fn(log10_l2) returns a tuple compared as larger-is-better; ties go to the larger l2.
  """
  scores = {}

  def score(v):
    v = round(float(v), 6)
    if v not in scores:
      scores[v] = score_fn(v)
    return scores[v]

  best = max(np.arange(lo, hi + 1e-9, first_step), key=lambda v: (score(v), v))
  step = first_step
  while step > 1.0 / steps_per_decade + 1e-9:
    step /= 2
    candidates = [v for v in (best - step, best, best + step) if lo - 1e-9 <= v <= hi + 1e-9]
    best = max(candidates, key=lambda v: (score(v), v))
  return round(float(best), 6), scores


def probe(train_x, train_y, val_x, val_y, test_x, test_y, num_classes, *, max_iter=1000):
  """The CLIP protocol end to end on features; returns the metrics dict."""
  x = np.concatenate([train_x, val_x]).astype(np.float32)
  y = np.concatenate([train_y, val_y])
  train_only = np.concatenate([np.ones(len(train_x)), np.zeros(len(val_x))]).astype(np.float32)

  def val_score(log10_l2):
    w, b, _ = fit(x, y, num_classes, 10.0 ** log10_l2, weights=train_only, max_iter=max_iter)
    logits = val_x @ w + b
    return topk_accuracy(logits, val_y, ks=(1,))['top1'], -log_loss(logits, val_y)

  best, scores = search_l2(val_score)
  w, b, iterations = fit(x, y, num_classes, 10.0 ** best, max_iter=max_iter)
  metrics = classification_metrics(test_x @ w + b, test_y, num_classes)
  metrics.update(l2=10.0 ** best, log10_l2=best, val_top1=scores[best][0],
                 num_l2_tried=len(scores), final_iterations=iterations,
                 num_train=len(train_y), num_val=len(val_y), num_test=len(test_y))
  return metrics


class Evaluator:
  """Linear-probe test accuracy, with the L2 strength chosen on a validation split."""
  needs_text = False

  def __init__(self, cfg, *, image_size):
    self.train = datasets.open_from_config(cfg, 'train_split', 'train', need_names=False)
    self.val = (datasets.open_from_config(cfg, 'val_split', need_names=False)
                if cfg.get('val_split') else None)
    self.test = datasets.open_from_config(cfg, 'test_split', need_names=False)
    self.val_fraction = float(cfg.get('val_fraction', 0.2))
    self.max_iter = int(cfg.get('max_iter', 1000))
    self.transform = eval_transform.EvalTransform.from_config(cfg, image_size)
    self.embed_args = (self.transform, int(cfg.get('batch_size', 256)))
    self.info = dict(dataset=cfg.get('dataset'), train_split=self.train.split,
                     val_split=self.val.split if self.val else f'{self.val_fraction:g} of train',
                     test_split=self.test.split, max_iter=self.max_iter,
                     **self.transform.info())

  def run(self, towers):
    train_x, train_y = embedding.embed_source(towers, self.train, *self.embed_args)
    if self.val is None:
      keep, held_out = datasets.holdout_indices(train_y, self.val_fraction)
      val_x, val_y = train_x[held_out], train_y[held_out]
      train_x, train_y = train_x[keep], train_y[keep]
    else:
      val_x, val_y = embedding.embed_source(towers, self.val, *self.embed_args)
    test_x, test_y = embedding.embed_source(towers, self.test, *self.embed_args)
    return probe(train_x, train_y, val_x, val_y, test_x, test_y, len(self.train.class_names),
                 max_iter=self.max_iter)
