"""Surface forms: one folding and one tokenizer for KB names and alt-texts alike.

Mention finding compares an alt-text with every label and alias of the KB. Both go through
`fold` and `tokens` here, so that a difference between them is never a difference in
normalisation:

  fold    per character: NFKC ('ＰＡＲＩＳ' -> 'PARIS', 'ﬁ' -> 'fi'), casefold ('Straße' ->
          'strasse'), accents dropped (combining marks U+0300-U+036F after NFD: 'Beyoncé' ->
          'beyonce'; kana voicing marks are not in that block and stay: 'が' is not 'か'),
          quotes and apostrophes to "'" ('McDonald’s'), dashes and hyphens to a space
          ('Eiffel-Tower', 'Jay‐Z'), soft hyphens and other invisible format characters
          removed. It returns, for every output character, the index of the input character it
          came from, so a match in the folded text maps back to a span of the original.
  tokens  runs of word characters (letters, digits, the marks of the Indic and Southeast
          Asian scripts), split where a no-space script starts or ends ('tokyoの夜景'), and
          every other non-space character alone ('AC/DC' -> ac / dc).
          'Parisian' is one token: 'paris' does not match inside it.

Scripts written without spaces (Han, kana, Hangul is spaced and excluded, Thai, Lao, Khmer,
Myanmar, Tibetan) have no word boundaries to match at, so a KB form that contains them also
gets a character key (CHAR_PREFIX + its folded characters without spaces), and the mention
finder queries that namespace from every character position of such text: '富士山' is found
in '東京タワーと富士山の夜景'.

Case survives folding only in `case_key`, which the mention finder's case rules compare
against (mentions.py): 'LA' must be written 'LA'.
"""
import functools
import re
import unicodedata

SEP = '\x1f'          # joins the tokens of a token key; never in a folded token
CHAR_PREFIX = '\x1e'  # starts a character key (no-space scripts)
_QUOTES = dict.fromkeys(map(ord, '\u2018\u2019\u201a\u201b\u2032\u02bc\u00b4`\uff07'), "'")
_DASHES = dict.fromkeys(map(ord, '-\u2010\u2011\u2012\u2013\u2014\u2015\u2212\ufe63\uff0d'),
                        ' ')
_WORD_EXTRA = ('\u0900-\u0dff'      # Indic scripts, marks included
               '\u0e00-\u0eff'      # Thai, Lao
               '\u0f00-\u0fff'      # Tibetan
               '\u1000-\u109f'      # Myanmar
               '\u1780-\u17ff'      # Khmer
               '\u3099\u309a')      # kana voicing marks
_NO_SPACE_CLASS = ('[\u0e00-\u0eff\u0f00-\u0fff\u1000-\u109f\u1780-\u17ff'  # Thai Lao Tibetan
                   '\u3040-\u30ff\u31f0-\u31ff\uff66-\uff9f'                # Myanmar Khmer, kana
                   '\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0003134f]')  # Han
_NO_SPACE = re.compile(_NO_SPACE_CLASS)
# A run of no-space-script characters, a run of other word characters, or one other character:
# 'tokyoの夜景' is 'tokyo' + 'の夜景'.
_TOKEN = re.compile(rf'{_NO_SPACE_CLASS}+|(?:(?!{_NO_SPACE_CLASS})[\w{_WORD_EXTRA}])+|'
                    rf'[^\w\s{_WORD_EXTRA}]')


@functools.lru_cache(maxsize=1 << 16)   # per character: every alt-text goes through here
def _fold_char(c, keep_case):
  if unicodedata.category(c) == 'Cf':          # soft hyphen, zero-width joiners, marks
    return ''
  s = unicodedata.normalize('NFKC', c)
  if not keep_case:
    s = s.casefold()
  s = ''.join(ch for ch in unicodedata.normalize('NFD', s)
              if not '\u0300' <= ch <= '\u036f')
  return unicodedata.normalize('NFC', s).translate(_QUOTES).translate(_DASHES)


def fold(text, keep_case=False):
  """-> (folded text, [index in `text` of each folded character])."""
  out, where = [], []
  for i, c in enumerate(text):
    piece = _fold_char(c, keep_case)
    out.append(piece)
    where.extend([i] * len(piece))
  return ''.join(out), where


def tokens(folded):
  """[(start, end)] of the tokens of a folded text."""
  return [m.span() for m in _TOKEN.finditer(folded)]


def token_key(text, keep_case=False):
  """The tokens of `text`, folded, joined by SEP: the key of the surface index."""
  folded, _ = fold(text, keep_case)
  return SEP.join(folded[s:e] for s, e in tokens(folded))


def case_key(text):
  """token_key with case kept: what a case-sensitive form is compared with."""
  return token_key(text, keep_case=True)


def normalize(text):
  """The folded tokens joined by one space: the key of the alias index (kb.normalize_alias)."""
  return token_key(text).replace(SEP, ' ')


def has_no_space_script(text):
  return _NO_SPACE.search(text) is not None


def char_key(text):
  """The character key of a form written in a no-space script ('' if it has none, or fewer
  than two characters: one Han character alone is a word in too many names)."""
  if not has_no_space_script(text):
    return ''
  chars = ''.join(fold(text)[0].split())
  return CHAR_PREFIX + chars if len(chars) >= 2 else ''


def is_lower(text):
  """Written in lower case where case exists ('paris'; not 'Paris', not '東京')."""
  return text == text.lower() and text != text.upper()


def is_case_sensitive(form):
  """Forms that name something only as written: all capitals ('LA', 'AC/DC', 'IT') or at most
  three letters or digits ('He', 'Die', 'It')."""
  folded = ''.join(c for c in fold(form)[0] if c.isalnum())
  upper = form == form.upper() and form != form.lower()
  return upper or 0 < len(folded) <= 3
