"""The paper-scale configs (configs/mofi_{b16,l14,h14}.py) against what the MOFI release states,
independently of the golden snapshots (which only catch drift).

Source: apple/ml-mofi README.md, "The following checkpoints are provided" (image params / text
params / GPR1200): MOFI-B16 86M / 64M / 83.41%, MOFI-L14 303M / 124M / 86.14%, MOFI-H14 631M /
354M / 86.75%; its evaluation transform resizes and crops to 224 px. The paper's abstract: I2E
has 2 million distinct entities. The counts are the towers without their output projection
(the embedding dimension is not published): with it, L/14 and H/14 would round to 304M and
632M. The text count needs the released models' OPT tokenizer: CLIP's 49,408-token BPE gives
B/16 a 63M tower.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import mofi_b16, mofi_h14, mofi_l14
from mofi_jax.models import text, vit

RELEASED = {   # ml-mofi README: millions of parameters, rounded
    'B/16': (mofi_b16, 86, 64),
    'L/14': (mofi_l14, 303, 124),
    'H/14': (mofi_h14, 631, 354),
}


def params_without_projection(module, example):
  params = jax.eval_shape(lambda: module.init(jax.random.key(0), example))['params']
  params = {k: v for k, v in params.items() if k != 'proj'}
  return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(params))


@pytest.mark.parametrize('variant', sorted(RELEASED))
@pytest.mark.parametrize('mode', ['supervised', 'contrastive', 'multitask'])
def test_paper_configs_have_the_released_sizes(variant, mode):
  module, image_m, text_m = RELEASED[variant]
  c = module.get_config(mode)
  assert c.model.image.variant == variant
  assert c.input.image_size == 224
  if mode != 'contrastive':
    assert c.model.head.num_classes == 2_000_000
  size = c.input.image_size
  image = vit.VisionTower(c.model.embed_dim, **vit.decode_variant(variant))
  n_image = params_without_projection(image, jnp.zeros((1, size, size, 3)))
  assert round(n_image / 1e6) == image_m, n_image
  tower = text.TextTower(c.model.embed_dim, **dict(c.model.text))
  n_text = params_without_projection(tower, jnp.zeros((1, c.model.text.context), jnp.int32))
  assert round(n_text / 1e6) == text_m, n_text


@pytest.mark.parametrize('name, variant', [('ViT-B-16', 'B/16'), ('ViT-L-14', 'L/14'),
                                           ('ViT-H-14', 'H/14')])
def test_configs_by_open_clip_name_are_the_paper_configs(name, variant):
  from configs import mofi  # pylint: disable=import-outside-toplevel
  for mode in ('supervised', 'contrastive', 'multitask'):
    assert (mofi.get_config(f'{name},{mode}').to_dict()
            == RELEASED[variant][0].get_config(mode).to_dict())
  assert mofi.get_config(name).to_dict() == RELEASED[variant][0].get_config().to_dict()
  with pytest.raises(ValueError, match='the paper trains B/16, L/14, H/14 only'):
    mofi.get_config('ViT-S-16')
  # The table in configs/common.py agrees with the library's parser of ViT names.
  from configs import common  # pylint: disable=import-outside-toplevel
  from mofi_jax.models import names  # pylint: disable=import-outside-toplevel
  assert all(names.canonical_variant(k) == v for k, v in common.OPEN_CLIP_NAMES.items())
