"""Tokenizers across the boundary, and where the text tower pools.

transformers' CLIPTextModel pools at the first `eos_token_id` in the ids, except
that a config with eos_token_id == 2 (written before its PR #24773) selects the
legacy rule argmax(ids). Our corpus tokenizer has <pad>=0, <bos>=1, <eot>=2 and
our tower pools at the last non-pad id. <eot>=2 would trigger the legacy rule,
so the export swaps ids 2 and V-1 (V the vocabulary size) in both the tokenizer
file and the token embedding: the exported model then pools at its first
<eot> = V-1, which is where ours pools on every text the tokenizer produces.

On import, the folder's config decides the pool rule (text.pool 'first_eot' or
'max_id', see models/text.py) and its tokenizer.json is used as is; rows are
padded with <eot>, which neither rule can mistake for the real one.
"""
import dataclasses
import json
import os
from typing import Optional

import numpy as np
import tokenizers

from mofi_jax.data import tokenizer as tokenizer_lib
from mofi_jax.interop.clip_config import LEGACY_EOS_ID, InteropError
from mofi_jax.models import text as text_lib

# Byte-level BPE tokenizers as CLIP and the released MOFI folders save them (transformers 5
# saves a PreTrainedTokenizerFast as TokenizersBackend).
SUPPORTED_TOKENIZERS = ('CLIPTokenizer', 'CLIPTokenizerFast', 'GPT2Tokenizer',
                        'GPT2TokenizerFast', 'PreTrainedTokenizerFast', 'TokenizersBackend')
PROBE_TEXTS = ('a', 'a photo of a cat', 'Lequyl, a cyan star', 'x' * 40, '')


@dataclasses.dataclass(frozen=True)
class TextIds:
  """Special ids of an exported tokenizer, and the id swap that produced them."""
  bos: Optional[int]
  eot: int
  pad: int
  config_eos: int                 # text_config.eos_token_id: eot, or 2 for argmax
  swap: Optional[tuple] = None    # (a, b): ids a and b trade places

  def hf_config_ids(self):
    return dict(bos_token_id=self.bos, eos_token_id=self.config_eos, pad_token_id=self.pad)


def _swapped(i, swap):
  if swap and i in swap:
    return swap[1] if i == swap[0] else swap[0]
  return i


def plan_text_ids(text_cfg, tok, vocab_size):
  """The TextIds that make transformers pool where our text tower does."""
  pool = text_cfg.get('pool', 'last_nonpad')
  probe = tok.encode('a').ids
  if pool == 'last_nonpad':
    eot, pad = tokenizer_lib.eot_id(tok), tokenizer_lib.PAD_ID
  elif pool == 'first_eot':
    eot = pad = int(text_cfg['eot_id'])
  else:  # 'max_id': the legacy rule, kept as is.
    eot = pad = probe[-1]
  if not probe or probe[-1] != eot:
    raise InteropError(f'the tokenizer ends texts with id {probe[-1:]}, but the text tower '
                       f'(pool={pool!r}) pools at <eot> id {eot}.')
  bos = probe[0] if len(probe) > 2 else None
  if pool == 'max_id':
    return TextIds(bos, eot, pad, config_eos=LEGACY_EOS_ID)
  swap = (eot, vocab_size - 1) if eot == LEGACY_EOS_ID else None
  s = lambda i: None if i is None else _swapped(i, swap)
  return TextIds(s(bos), s(eot), s(pad), config_eos=s(eot), swap=swap)


def _remap_ids(node, swap):
  """Swaps ids in a tokenizer.json post-processor (any nesting)."""
  if isinstance(node, dict):
    return {k: ([_swapped(i, swap) for i in v] if k == 'ids' else
                _swapped(v, swap) if k == 'id' and isinstance(v, int) else
                _remap_ids(v, swap)) for k, v in node.items()}
  if isinstance(node, list):
    if len(node) == 2 and isinstance(node[0], str) and isinstance(node[1], int):
      return [node[0], _swapped(node[1], swap)]   # Roberta/Bert ('</s>', 2)
    return [_remap_ids(v, swap) for v in node]
  return node


def swapped_tokenizer(tok, swap):
  """A copy of `tok` whose ids `swap` = (a, b) trade places; checked on probe texts."""
  if not swap:
    return tok
  spec = json.loads(tok.to_str())
  vocab = spec['model']['vocab']
  if isinstance(vocab, dict):
    spec['model']['vocab'] = {t: _swapped(i, swap) for t, i in vocab.items()}
  else:  # Unigram: a list whose index is the id.
    a, b = swap
    vocab[a], vocab[b] = vocab[b], vocab[a]
  for added in spec.get('added_tokens') or []:
    added['id'] = _swapped(added['id'], swap)
  spec['post_processor'] = _remap_ids(spec.get('post_processor'), swap)
  new = tokenizers.Tokenizer.from_str(json.dumps(spec))
  for text in PROBE_TEXTS:
    want = [_swapped(i, swap) for i in tok.encode(text).ids]
    if new.encode(text).ids != want:
      raise InteropError(f'swapping token ids {swap} changed how {text!r} tokenizes; '
                         'this tokenizer layout is not supported for export.')
  return new


def tokenizer_config(tok, ids, text_len):
  """tokenizer_config.json: a fast tokenizer with our special tokens.

  tok: the exported (swapped) tokenizer, whose ids `ids` holds.
  """
  name = lambda i: None if i is None else tok.id_to_token(i)
  return dict(tokenizer_class='PreTrainedTokenizerFast', bos_token=name(ids.bos),
              eos_token=name(ids.eot), pad_token=name(ids.pad), model_max_length=text_len,
              padding_side='right', truncation_side='right')


# ----------------------------------------------------------------------------
# Import.


def check_tokenizer_config(folder):
  """Refuses a tokenizer_config.json naming a class outside SUPPORTED_TOKENIZERS, or custom
  code (auto_map), before transformers sees the folder: AutoTokenizer would otherwise
  import whatever class the file names."""
  path = os.path.join(folder, 'tokenizer_config.json')
  if not os.path.isfile(path):
    return   # transformers then picks the tokenizer of config.json's model_type (clip)
  try:
    with open(path, encoding='utf-8') as f:
      raw = json.load(f)
  except (OSError, ValueError) as e:
    raise InteropError(f'{path}: not a readable JSON file ({e}).') from e
  check_tokenizer_fields(raw, path)


def check_tokenizer_fields(raw, path):
  """The checks of `check_tokenizer_config` on a parsed tokenizer_config.json."""
  if not isinstance(raw, dict):
    raise InteropError(f'{path}: expected a JSON object, got {type(raw).__name__}.')
  name = raw.get('tokenizer_class')
  if name is not None and name not in SUPPORTED_TOKENIZERS:
    raise InteropError(f'{path}: field tokenizer_class is {name!r}; mofi_jax loads only '
                       f'{", ".join(SUPPORTED_TOKENIZERS)}.')
  if 'auto_map' in raw:
    raise InteropError(f'{path}: field auto_map names custom tokenizer code; mofi_jax never '
                       'runs code from a model folder.')


def load_folder_tokenizer(folder):
  """A folder's tokenizer as a `tokenizers.Tokenizer`, or None if it has none."""
  path = os.path.join(folder, 'tokenizer.json')
  if os.path.isfile(path):
    try:
      tok = tokenizers.Tokenizer.from_file(path)
    except Exception as e:  # The Rust side raises a bare Exception.
      raise InteropError(f'{path}: not a valid tokenizers JSON file ({e}).') from e
  elif all(os.path.isfile(os.path.join(folder, n)) for n in ('vocab.json', 'merges.txt')):
    import transformers  # pylint: disable=g-import-not-at-top
    check_tokenizer_config(folder)
    tok = transformers.AutoTokenizer.from_pretrained(
        folder, trust_remote_code=False).backend_tokenizer
  else:
    return None
  tok.no_padding()
  tok.no_truncation()
  return tok


def load_auto_tokenizer(folder):
  """The folder's transformers tokenizer (AutoTokenizer), or None if it has none.

  transformers, not the bare tokenizer.json, decides what a folder's tokenizer adds: its
  tokenizer_config.json may add a <bos> or an <eos> the file's post-processor lacks, and
  names the pad token and the padding side.
  """
  if not any(os.path.isfile(os.path.join(folder, n)) for n in
             ('tokenizer.json', 'vocab.json', 'tokenizer_config.json')):
    return None
  try:
    import transformers  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise InteropError(f'{folder}: reading its tokenizer needs transformers '
                       '(pip install -e ".[export]").') from e
  check_tokenizer_config(folder)
  try:
    return transformers.AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
  except Exception as e:  # pylint: disable=broad-except  # tokenizers raises bare Exception
    raise InteropError(f'{folder}: transformers cannot load its tokenizer '
                       f'({type(e).__name__}: {str(e).splitlines()[0] if str(e) else e!r}).'
                       ) from e


def make_tokenize(tok, text_cfg, length):
  """texts -> int32 [N, length]: what `tok(texts, padding=True)` gives, for CLIPTextModel.

  `tok` is the folder's transformers tokenizer. Each row holds that batch's ids: the
  tokenizer's own special tokens, padded with its pad token on its padding side to the
  longest text. Texts longer than `length` keep their first ids (and a final <eos>).
  The columns past the longest text are filled with an id that neither pooling rule can
  pick (0 for argmax, a non-<eos> id for first-<eos>), and the causal mask keeps them
  from every earlier position, so the features are transformers' for the same batch.
  """
  eos = int(text_cfg['eot_id']) if text_cfg['pool'] == 'first_eot' else None
  filler = 1 if eos == 0 else 0
  pad = filler if tok.pad_token_id is None else int(tok.pad_token_id)
  left = tok.padding_side == 'left'

  def fit(ids):
    if ids and ids[-1] == tok.eos_token_id:
      return tokenizer_lib.fit_ids(ids, length, ids[-1])
    return ids[:length]

  def tokenize(texts):
    if isinstance(texts, str):
      raise TypeError('tokenize: `texts` must be a list of strings, not a single string.')
    rows = [fit(list(ids)) for ids in tok(list(texts), padding=False)['input_ids']]
    longest = max(map(len, rows), default=0)
    out = np.full((len(rows), length), filler, np.int32)
    for out_row, ids in zip(out, rows):
      pads = [pad] * (longest - len(ids))
      out_row[:longest] = pads + ids if left else ids + pads
    return out
  return tokenize


def batch_dependent(tokenize, text_cfg):
  """Whether a text's features depend on the other texts of its batch under this
  tokenizer and pooling rule, as they do in transformers (left padding; or a pooled
  position that moves when a longer text pads it)."""
  alone, padded = tokenize(['a']), tokenize(['a', 'a photo of a cat on a mat'])
  pos = lambda t: np.asarray(text_lib.eot_positions(t, text_cfg['pool'],
                                                    text_cfg.get('eot_id', -1)))[0]
  return bool(alone[0, 0] != padded[0, 0] or pos(alone) != pos(padded))
