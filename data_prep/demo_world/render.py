"""Rendering the demo world: vectorised numpy masks over a whole chunk of images at once."""
import hashlib
import io
import json
import os

import numpy as np
from PIL import Image

from data_prep.demo_world.world import (BACKGROUNDS, PALETTE, SHAPES, SIZE_SCALE, SIZES,
                                        color_name, describe)

RETRIEVAL_PER_CATEGORY = 10  # GPR1200 layout: exactly 10 images per category.
_RENDER_CHUNK = 512


def render_jpegs(rng, combos_per_image, size):
  """List (per image) of 1 or 2 attribute combos -> list of JPEG bytes."""
  params = _sample_params(rng, combos_per_image)
  out = []
  for start in range(0, len(combos_per_image), _RENDER_CHUNK):
    pixels = _render(rng, params, slice(start, start + _RENDER_CHUNK), size)
    for image in pixels:
      buf = io.BytesIO()
      Image.fromarray(image).save(buf, format='JPEG', quality=90)
      out.append(buf.getvalue())
  return out


def _sample_params(rng, combos_per_image):
  """Per-image instance variation: position, scale, rotation, colour jitter, pattern."""
  n = len(combos_per_image)
  two = np.array([len(c) == 2 for c in combos_per_image])[:, None]
  first = np.array([c[0] for c in combos_per_image]).reshape(n, -1)
  second = np.array([c[-1] for c in combos_per_image]).reshape(n, -1)
  color = np.array(list(PALETTE.values()), np.float32)[np.stack([first[:, 1], second[:, 1]], 1)]
  scale = np.ones((n, 2))
  if first.shape[1] > 3:   # the size attribute (world.SIZES); a factor of 1 in the default world
    scale = np.array(SIZE_SCALE)[np.stack([first[:, 3], second[:, 3]], 1)]
  # Pairs sit side by side and are smaller; singles sit near the centre.
  pair_x = np.array([0.28, 0.72]) + rng.uniform(-0.04, 0.04, (n, 2))
  params = dict(
      shape=np.stack([first[:, 0], np.where(two[:, 0], second[:, 0], -1)], 1),
      color=color * rng.uniform(0.85, 1.1, (n, 2, 1)) + rng.normal(0, 12, (n, 2, 3)),
      cx=np.where(two, pair_x, 0.5 + rng.uniform(-0.12, 0.12, (n, 2))),
      cy=0.5 + rng.uniform(-0.1, 0.1, (n, 2)),
      radius=scale * np.where(two, rng.uniform(0.15, 0.2, (n, 2)),
                              rng.uniform(0.24, 0.36, (n, 2))),
      angle=np.deg2rad(rng.uniform(-20, 20, (n, 2))),
      bg=first[:, 2], period=rng.uniform(0.15, 0.25, n), phase=rng.uniform(0, 1, (n, 2)),
      lo=rng.uniform(25, 60, n), hi=rng.uniform(170, 235, n),
      bg_angle=rng.uniform(0, 2 * np.pi, n))
  return {k: v.astype(np.float32) if v.dtype == np.float64 else v for k, v in params.items()}


def _render(rng, params, sl, size):
  """Renders images `sl` of `params` -> uint8 [n, size, size, 3]."""
  p = {k: v[sl] for k, v in params.items()}
  g = (np.arange(size, dtype=np.float32) + 0.5) / size
  x, y = g[None, None, :], g[None, :, None]
  gray = p['lo'][:, None, None] + (p['hi'] - p['lo'])[:, None, None] * _pattern(p, x, y)
  image = np.repeat(gray[..., None], 3, axis=-1)
  for k in range(2):
    c, s = np.cos(p['angle'][:, k])[:, None, None], np.sin(p['angle'][:, k])[:, None, None]
    dx, dy = x - p['cx'][:, k, None, None], y - p['cy'][:, k, None, None]
    r = p['radius'][:, k, None, None]
    u, v = (c * dx + s * dy) / r, (c * dy - s * dx) / r
    mask = np.zeros(u.shape, bool)
    for i in range(len(SHAPES)):  # Each shape only on its own images (-1: no object).
      idx = np.flatnonzero(p['shape'][:, k] == i)
      mask[idx] = _shape_mask(i, u[idx], v[idx])
    image = np.where(mask[..., None], p['color'][:, k, None, None, :], image)
  image += rng.standard_normal(image.shape, np.float32) * 5.0
  return np.clip(np.round(image), 0, 255).astype(np.uint8)


def _pattern(p, x, y):
  """Background mix weight in [0, 1] between the dark and light grey of each image."""
  band = lambda a: np.floor(2 * a) % 2  # Alternating half-period bands.
  u = x / p['period'][:, None, None] + p['phase'][:, 0, None, None]
  w = y / p['period'][:, None, None] + p['phase'][:, 1, None, None]
  u, w = np.broadcast_arrays(u, w)
  a = p['bg_angle'][:, None, None]
  ramp = lambda i: np.clip((x - 0.5) * np.cos(a[i]) + (y - 0.5) * np.sin(a[i]) + 0.5, 0, 1)
  patterns = (  # Same order as BACKGROUNDS.
      lambda i: np.zeros_like(u[i]), lambda i: np.ones_like(u[i]), lambda i: band(w[i]),
      lambda i: band(u[i]), lambda i: (band(u[i]) + band(w[i])) % 2,
      lambda i: np.hypot(u[i] % 1 - 0.5, w[i] % 1 - 0.5) < 0.25,
      lambda i: band((u[i] + w[i]) / 1.4), ramp)
  out = np.empty(u.shape, np.float32)
  for b, pattern in enumerate(patterns):
    idx = np.flatnonzero(p['bg'] == b)
    out[idx] = pattern(idx)
  return out


def _shape_mask(index, u, v):
  """Mask of SHAPES[index] in local coordinates (units of the radius, y down)."""
  au, av, r = np.abs(u), np.abs(v), np.hypot(u, v)
  name = SHAPES[index]
  if name == 'circle':
    return r <= 1.0
  if name == 'square':
    return np.maximum(au, av) <= 0.8
  if name == 'triangle':
    return (v <= 0.7) & (au <= 0.6 * (v + 1.0))
  if name == 'diamond':
    return au + av <= 1.0
  if name == 'cross':
    return ((au <= 0.3) & (av <= 0.95)) | ((av <= 0.3) & (au <= 0.95))
  if name == 'star':
    return r <= 0.4 + 0.6 * ((np.cos(5 * np.arctan2(u, -v)) + 1) / 2) ** 3
  if name == 'ring':
    return (r >= 0.55) & (r <= 1.0)
  if name == 'hexagon':
    return np.maximum(au * 0.866 + av * 0.5, av) <= 0.87
  raise ValueError(f'unknown shape {name!r}')


def write_retrieval(rng, folder, combos, size):
  os.makedirs(folder)
  per_image = [[c] for c in combos for _ in range(RETRIEVAL_PER_CATEGORY)]
  images = render_jpegs(rng, per_image, size)
  for i, jpeg in enumerate(images):
    category = i // RETRIEVAL_PER_CATEGORY
    name = hashlib.sha1(jpeg).hexdigest()[:12]
    with open(os.path.join(folder, f'{category}_{name}.jpg'), 'wb') as f:
      f.write(jpeg)
  info = [dict(category=i, description=describe(c), shape=SHAPES[c[0]],
               color=color_name(c[1]), background=BACKGROUNDS[c[2]],
               **({'size': SIZES[c[3]]} if c[3] else {}))
          for i, c in enumerate(combos)]
  with open(os.path.join(folder, 'categories.json'), 'w') as f:
    json.dump(info, f, indent=1)
