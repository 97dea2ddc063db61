"""Model towers: published parameter counts, pooling, causality, dtypes,
scan == unrolled, remat == plain."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mofi_jax.data import pixels as mofi_pixels
from mofi_jax.models import mofi, names, text, vit


def n_params(tree):
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def abstract_params(module, *args):
  return nn.unbox(jax.eval_shape(module.init, jax.random.key(0), *args)['params'])


def test_uint8_pixels_are_normalised_on_the_device_as_float64_numpy_does():
  model = mofi.Mofi(mode='supervised', embed_dim=8, image=dict(
      width=16, depth=1, num_heads=2, mlp_dim=32, patch=8, pool='cls'),
      head=dict(num_classes=4, kind='linear'))
  pixels = np.random.default_rng(0).integers(0, 256, (2, 16, 16, 3), dtype=np.uint8)
  reference = ((pixels / 255.0 - np.asarray(mofi_pixels.CLIP_MEAN)) /
               np.asarray(mofi_pixels.CLIP_STD)).astype(np.float32)
  params = model.init(jax.random.key(0), reference)['params']
  encode = lambda x: model.apply({'params': params}, x, method=mofi.Mofi.encode_image)
  np.testing.assert_allclose(mofi_pixels.normalize(jnp.asarray(pixels)), reference,
                             atol=1e-6, rtol=0)
  np.testing.assert_allclose(encode(pixels), encode(reference), atol=1e-5, rtol=0)
  assert np.abs(np.asarray(encode(pixels / 255.0)) - np.asarray(encode(reference))).max() > 1e-3


def test_vit_b16_and_text_tower_match_openai_clip_parameter_counts():
  # OpenAI CLIP ViT-B/16: visual 86,192,640; text side 63,428,096 (+1 logit scale).
  image = vit.VisionTower(512, **vit.decode_variant('B/16'))
  p = abstract_params(image, jax.ShapeDtypeStruct((1, 224, 224, 3), jnp.float32))
  assert n_params(p) == 86_192_640
  tower = text.TextTower(512, vocab_size=49408, context=77, width=512, depth=12,
                         num_heads=8, mlp_dim=2048)
  p = abstract_params(tower, jax.ShapeDtypeStruct((1, 77), jnp.int32))
  assert n_params(p) == 63_428_096


@pytest.mark.parametrize('variant,width,depth', [('Ti/16', 192, 12), ('S/14', 384, 12),
                                                 ('L/14', 1024, 24), ('H/14', 1280, 32)])
def test_presets_and_any_image_size(variant, width, depth):
  kw = vit.decode_variant(variant)
  assert (kw['width'], kw['depth']) == (width, depth)
  for size in (112, 140):
    p = abstract_params(vit.VisionTower(64, **kw),
                        jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32))
    tokens = (size // kw['patch']) ** 2 + 1
    assert p['pos_embedding'].shape == (tokens, width)


def test_unknown_variant_is_a_clear_error():
  with pytest.raises(ValueError, match='unknown ViT variant'):
    vit.decode_variant('X/16')


def patch_embed_float64(images, kernel):
  """A VALID stride-p convolution as an explicit float64 sum over each patch."""
  p = kernel.shape[0]
  b, rows, cols, _ = images.shape
  out = np.zeros((b, rows // p, cols // p, kernel.shape[-1]))
  for i in range(rows // p):
    for j in range(cols // p):
      window = images[:, i * p:(i + 1) * p, j * p:(j + 1) * p].astype(np.float64)
      out[:, i, j] = np.einsum('bpqc,pqcd->bd', window, kernel.astype(np.float64))
  return out


@pytest.mark.parametrize('size', [(32, 32), (37, 42)])   # 37 x 42: VALID drops the rest
def test_patch_embed_is_the_strided_convolution_in_float64(size):
  images = np.random.default_rng(0).normal(size=(2, *size, 3)).astype(np.float32)
  module = vit.PatchEmbed(width=8, patch=16)
  params = nn.meta.unbox(module.init(jax.random.PRNGKey(0), images))['params']
  got = np.asarray(module.apply({'params': params}, images))
  want = patch_embed_float64(images, np.asarray(params['kernel']))
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
  conv = nn.Conv(8, (16, 16), strides=16, padding='VALID', use_bias=False)
  np.testing.assert_allclose(got, conv.apply({'params': params}, images), atol=1e-5)
  grad = jax.grad(lambda k: module.apply({'params': {'kernel': k}}, images).sum())
  want_grad = jax.grad(lambda k: conv.apply({'params': {'kernel': k}}, images).sum())
  np.testing.assert_allclose(grad(params['kernel']), want_grad(params['kernel']),
                             atol=1e-4, rtol=1e-5)


def small_vit(**kw):
  base = dict(embed_dim=8, width=16, depth=2, num_heads=2, mlp_dim=32, patch=4)
  return vit.VisionTower(**{**base, **kw})


def test_gap_pooling_has_no_cls_token():
  tower = small_vit(pool='gap')
  x = jax.random.normal(jax.random.key(1), (2, 16, 16, 3))
  params = tower.init(jax.random.key(0), x)
  assert 'cls' not in params['params']
  cls_params = small_vit(pool='cls').init(jax.random.key(0), x)
  assert 'cls' in cls_params['params']


def test_bf16_compute_keeps_fp32_params_and_is_close_to_fp32():
  x = jax.random.normal(jax.random.key(1), (2, 16, 16, 3))
  params = small_vit(dtype=jnp.bfloat16).init(jax.random.key(0), x)
  assert {a.dtype for a in jax.tree.leaves(params)} == {jnp.dtype('float32')}
  out16 = small_vit(dtype=jnp.bfloat16).apply(params, x)
  out32 = small_vit().apply(params, x)
  assert out16.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.float32(out16), out32, rtol=0.1, atol=0.05)
  assert not np.allclose(np.float32(out16), out32, rtol=0, atol=1e-6)


def small_text(**kw):
  base = dict(embed_dim=8, vocab_size=50, context=10, width=16, depth=2,
              num_heads=2, mlp_dim=32)
  return text.TextTower(**{**base, **kw})


def test_text_pools_at_eot_and_is_causal():
  tokens = jnp.array([[1, 5, 7, 2, 0, 0, 0, 0, 0, 0]])   # <bos> a b <eot> pad...
  tower = small_text()
  params = tower.init(jax.random.key(0), tokens)
  out = tower.apply(params, tokens)
  # Causal + pooled at <eot>: the unpadded sequence gives the same embedding.
  np.testing.assert_allclose(tower.apply(params, tokens[:, :4]), out, rtol=1e-5,
                             atol=1e-6)
  # A token before <eot> matters; a longer text pools later.
  assert not np.allclose(tower.apply(params, tokens.at[0, 1].set(6)), out)
  longer = jnp.array([[1, 5, 7, 8, 2, 0, 0, 0, 0, 0]])
  assert not np.allclose(tower.apply(params, longer), out)


def test_scanned_stack_equals_unrolled_stack():
  x = jax.random.normal(jax.random.key(1), (2, 16, 16, 3))
  unrolled = small_vit()
  params = nn.unbox(unrolled.init(jax.random.key(0), x)['params'])
  enc = params['encoder']
  stacked = jax.tree.map(lambda *ls: jnp.stack(ls), enc['layers_0'], enc['layers_1'])
  scanned_params = dict(params, encoder={'layers': stacked})
  scanned = small_vit(scan=True)
  ref_shapes = jax.tree.map(lambda a: a.shape, abstract_params(scanned, x))
  assert jax.tree.map(lambda a: a.shape, scanned_params) == ref_shapes
  np.testing.assert_allclose(scanned.apply({'params': scanned_params}, x),
                             unrolled.apply({'params': params}, x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('policy', ['full', 'dots'])
def test_remat_does_not_change_gradients(policy):
  x = jax.random.normal(jax.random.key(1), (2, 16, 16, 3))
  plain, remat = small_vit(scan=True), small_vit(scan=True, remat=policy)
  params = plain.init(jax.random.key(0), x)
  grad = lambda m: jax.grad(lambda p: jnp.sum(m.apply(p, x) ** 2))(params)
  for a, b in zip(jax.tree.leaves(grad(plain)), jax.tree.leaves(grad(remat))):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_mofi_modes_create_only_their_parts():
  cfg = dict(embed_dim=8, image=dict(width=16, depth=1, num_heads=2, mlp_dim=32, patch=4),
             text=dict(vocab_size=50, context=10, width=16, depth=1, num_heads=2,
                       mlp_dim=32),
             head=dict(num_classes=10, pad_multiple=16))
  x = jnp.zeros((1, 16, 16, 3))
  t = jnp.ones((1, 10), jnp.int32)
  for mode, parts in [('supervised', {'image_tower', 'entity_head'}),
                      ('contrastive', {'image_tower', 'text_tower', 'log_logit_scale'}),
                      ('multitask', {'image_tower', 'text_tower', 'log_logit_scale',
                                     'entity_head'})]:
    model = mofi.Mofi(mode=mode, **cfg)
    params = model.init(jax.random.key(0), x, t)['params']
    assert set(params) == parts
    out = model.apply({'params': params}, x, t)
    if 'entity_head' in parts:   # big-label-space init: zero kernel, negative bias
      assert out['head']['kernel'].shape == (8, 16)
      assert np.all(out['head']['kernel'] == 0) and np.all(out['head']['bias'] == -10)
    if 'text_tower' in parts:
      assert float(out['logit_scale']) == pytest.approx(1 / 0.07, rel=1e-5)


def test_logit_scale_is_exp_of_the_parameter_and_the_clamp_caps_it():
  """The forward is exp(p), so the gradient never vanishes; the train step
  keeps p in [0, log(100)] with clamp_logit_scale (tests/test_trainer.py)."""
  cfg = dict(embed_dim=8, image=dict(width=16, depth=1, num_heads=2, mlp_dim=32, patch=4),
             text=dict(vocab_size=50, context=10, width=16, depth=1, num_heads=2,
                       mlp_dim=32))
  model = mofi.Mofi(mode='contrastive', **cfg)
  x, t = jnp.zeros((1, 16, 16, 3)), jnp.ones((1, 10), jnp.int32)
  params = model.init(jax.random.key(0), x, t)['params']
  for value, clamped in ((500.0, 100.0), (0.5, 1.0), (42.0, 42.0)):
    params = dict(params, log_logit_scale=jnp.log(value))
    assert float(model.apply({'params': params}, x, t)['logit_scale']) == pytest.approx(value)
    capped = mofi.clamp_logit_scale(params, 100.0)
    assert float(jnp.exp(capped['log_logit_scale'])) == pytest.approx(clamped, rel=1e-6)

@pytest.mark.parametrize('name, canonical', [
    ('B/16', 'B/16'), ('ViT-B-16', 'B/16'), ('ViT-L-14', 'L/14'), ('vit_h14', 'H/14'),
    ('ViT-H/14', 'H/14'), ('ti-16', 'Ti/16'), (' S/32 ', 'S/32')])
def test_open_clip_names_are_ours(name, canonical):
  assert names.canonical_variant(name) == canonical
  assert vit.decode_variant(name) == vit.decode_variant(canonical)


@pytest.mark.parametrize('name', ['ViT-g-14', 'ViT-B', 'B/16/2', 'ViT-B-16-quickgelu', ''])
def test_unknown_names_say_both_spellings(name):
  with pytest.raises(ValueError, match=r'"B/16".*"ViT-B-16"'):
    names.canonical_variant(name)
