"""ViT size names: ours ('B/16', big_vision's) and open_clip's ('ViT-B-16'), one spelling.

Light on purpose (no JAX, no Flax): config files import it."""
import re

SIZES = ('Ti', 'S', 'B', 'L', 'H')
_NAME = re.compile(r'^(?:vit[-_]?)?(ti|s|b|l|h)[-/_]?(\d+)$', re.IGNORECASE)


def canonical_variant(name):
  """'ViT-B-16', 'vit_b16', 'B-16', 'B/16' -> 'B/16'; raises ValueError naming the forms."""
  m = _NAME.match(str(name).strip())
  if not m:
    raise ValueError(f'unknown ViT variant {name!r}; expected <{"|".join(SIZES)}>/<patch> '
                     '(big_vision, e.g. "B/16") or ViT-<size>-<patch> (open_clip, e.g. '
                     '"ViT-B-16").')
  size = {s.upper(): s for s in SIZES}[m.group(1).upper()]
  return f'{size}/{int(m.group(2))}'
