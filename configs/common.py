"""The base config every MOFI config derives from (big_vision-style ConfigDicts).

Paths may use `{workdir}`; eval paths may also use `{data_dir}` (the corpus).
"""
import ml_collections as mlc


def base_config(mode='multitask'):
  c = mlc.ConfigDict()
  c.seed = 0
  c.total_steps = 10_000
  c.log_every = 100
  c.nonfinite = 'stop'          # 'stop' (exit naming the step) | 'skip' (drop the update)

  # Mesh axes sizes over ('data', 'fsdp', 'model'); -1 = all remaining devices.
  c.mesh = mlc.ConfigDict(dict(data=1, fsdp=-1, model=1))

  c.input = mlc.ConfigDict(dict(
      data_dir='{workdir}/corpus',
      batch_size=256,             # global
      image_size=224,
      max_entities=4,             # K: labels per image kept for the loss
      text_source='entity',       # 'entity' (name + description) | 'alt_text'
      entity_template='{name}, {description}',
      text_len=77,
      shuffle_buffer=10_000,
      rrc_scale=(0.4, 1.0),
      max_bad_record_rate=0.001,  # bad records are skipped and logged; above this rate, stop
      eval_preprocess='tf',       # in-training evals: 'tf' | 'mofi' (ml-mofi's transform)
      device_prefetch=2,          # train batches held on the devices ahead of their step
      seed=0,
  ))

  c.model = mlc.ConfigDict(dict(
      mode=mode,
      embed_dim=512,
      image=dict(variant='B/16', pool='cls', act='gelu', ln_pre=True),
      text=dict(vocab_size=-1, context=77, width=512, depth=12, num_heads=8,
                mlp_dim=2048, act='gelu'),   # vocab_size -1: from the tokenizer
      head=dict(num_classes=-1, kind='linear', pad_multiple=4096,
                bias_init=-10.0, scale_init=16.0, learn_scale=True),  # -1: corpus
      logit_scale_init=1 / 0.07,
      logit_scale_max=100.0,
      dtype='bfloat16',
      scan=True,
      remat='none',               # none | full | dots | dots_no_batch | projections
      attention='xla',            # xla | head_major (CPU) | cudnn (GPU) | splash (TPU)
      lock_image=False,           # LiT: freeze the image tower (with config.init.*)
  ))

  c.loss = mlc.ConfigDict(dict(
      entity_weight=1.0, contrastive_weight=1.0,
      tile_size=4096,             # classes per tile of the entity loss
      head_dtype='float32',       # matmul dtype inside the entity loss
  ))

  c.optim = mlc.ConfigDict(dict(
      lr=1e-3, min_lr_ratio=0.0, warmup_steps=1000, weight_decay=0.1,
      b1=0.9, b2=0.98, eps=1e-6, clip_norm=1.0, head_lr_mult=1.0,
      mu_dtype='float32',         # Adam's first moment: float32 | bfloat16
      # Gradient accumulation: the global batch in this many pieces, with the whole
      # batch's negatives kept in the contrastive loss (mofi_jax/accumulation.py).
      microbatches=1))

  c.ckpt = mlc.ConfigDict(dict(every_steps=1000, keep=3, async_save=True))
  # Initialise before step 0 (never on resume), from one of: a Hugging Face CLIP folder on
  # local disk (OpenAI CLIP layout or a released MOFI folder, see mofi_jax/interop), or
  # our own workdir's checkpoint (step -1: newest) taking load = 'image' | 'towers' |
  # 'towers+head' (mofi_jax/warm_start.py).
  c.init = mlc.ConfigDict(dict(hf_clip='', workdir='', step=-1, load='towers'))
  c.profile = mlc.ConfigDict(dict(enabled=False, first_step=10, num_steps=5))
  # JAX's persistent compilation cache: '' = off; a folder ('{workdir}/...' allowed, gs://
  # too) where compiled steps are kept, so that a restarted (preempted) run skips the
  # compile. Programs that compiled faster than min_compile_secs are not stored.
  c.compile_cache = mlc.ConfigDict(dict(dir='', min_compile_secs=1.0))
  # Telemetry (mofi_jax/telemetry.py): metrics.jsonl and perf/ throughput every log_every
  # steps. MFU's peak FLOP/s per chip: 0 = TPU spec sheet, else a matmul measured at start-up
  # (CPU, GPU); > 0 = this value; -1 = no MFU.
  # W&B: --config.log.wandb.enabled=True (mode: '' = WANDB_MODE or W&B's default, 'offline').
  c.log = mlc.ConfigDict(dict(
      peak_flops_per_chip=0.0,
      wandb=dict(enabled=False, project='mofi_jax', entity='', name='', mode='')))
  # Evaluators run every `every_steps` and at the last step; eval_at_start: also at step 0,
  # the untrained baseline.
  c.eval_at_start = True
  c.evals = mlc.ConfigDict()
  return c


# CLIP-sized text towers, as paired with each image tower in CLIP / open_clip.
TEXT_TOWERS = {
    'B/16': dict(width=512, depth=12, num_heads=8, mlp_dim=2048),
    'L/14': dict(width=768, depth=12, num_heads=12, mlp_dim=3072),
    'H/14': dict(width=1024, depth=24, num_heads=16, mlp_dim=4096),
}
EMBED_DIMS = {'B/16': 512, 'L/14': 768, 'H/14': 1024}
# The paper's models in open_clip's spelling (mofi_jax/models/names.py parses any ViT name;
# configs import nothing from the library).
OPEN_CLIP_NAMES = {'ViT-B-16': 'B/16', 'ViT-L-14': 'L/14', 'ViT-H-14': 'H/14'}
OPT_VOCAB_SIZE = 50_272   # OPT's token embedding (50,265 tokens, padded to a multiple of 8)
# Rematerialisation, checked with `python -m mofi_jax.aot` on v5e-256 (128
# images per chip, 15.75 GiB usable HBM; docs/pod_scale.md) with the splash
# kernel: B/16 saves every projection ('projections'), L/14 and H/14 recompute
# whole blocks.
REMAT = {'B/16': 'projections', 'L/14': 'full', 'H/14': 'full'}
MODES = ('supervised', 'contrastive', 'multitask')


def paper_config(variant, mode):
  """MOFI at paper scale: 2M entities, 224 px, global batch 32,768, bf16,
  FSDP over the parameters (mesh fsdp=-1) and a class-sharded head; fits a
  v5e-256 slice with >= 10% HBM to spare."""
  if mode not in MODES:
    raise ValueError(f'unknown variant {mode!r}; expected one of {MODES}')
  variant = OPEN_CLIP_NAMES.get(variant, variant)
  if variant not in EMBED_DIMS:
    raise ValueError(f'{variant}: the paper trains {", ".join(EMBED_DIMS)} only (or, in '
                     f'open_clip\'s names, {", ".join(OPEN_CLIP_NAMES)}).')
  c = base_config(mode)
  c.total_steps = 1_200_000
  c.log_every = 100
  c.input.update(batch_size=32_768, image_size=224, text_len=77)
  c.model.embed_dim = EMBED_DIMS[variant]
  c.model.image.variant = variant
  # The released MOFI text towers read OPT's tokenizer (50,272 embedding rows): with it the
  # towers have ml-mofi's published sizes (tests/test_paper_configs.py).
  c.model.text.update(vocab_size=OPT_VOCAB_SIZE, **TEXT_TOWERS[variant])
  c.model.head.num_classes = 2_000_000
  c.model.remat = REMAT[variant]
  # TPU pods: the Pallas splash kernel (on GPU: --config.model.attention=cudnn).
  c.model.attention = 'splash'
  c.loss.head_dtype = 'bfloat16'   # fp32 accumulation and log-sum-exp
  c.optim.update(lr=5e-4, warmup_steps=10_000, weight_decay=0.2)
  c.ckpt.update(every_steps=2000, keep=3)
  c.compile_cache.dir = '{workdir}/compile_cache'   # minutes saved on every restart
  c.input.data_dir = 'gs://YOUR_BUCKET/i2e'   # the corpus from data_prep
  return c
