"""Zero-shot prompt templates, as published with CLIP (Radford et al., 2021).

Sources (OpenAI CLIP repository, MIT licence):
- IMAGENET: the 80 templates of notebooks/Prompt_Engineering_for_ImageNet.ipynb (also
  open_clip's OPENAI_IMAGENET_TEMPLATES), in that order;
- CIFAR: the 18 templates of data/prompts.md, shared by CIFAR10 and CIFAR100;
- CALTECH101 (34) and PETS (1): data/prompts.md, Caltech101 and OxfordPets.
`{}` is replaced by the class name. Order does not change the averaged class embedding,
but we keep the published order so the lists can be diffed against the sources.
"""

IMAGENET = (
    'a bad photo of a {}.', 'a photo of many {}.', 'a sculpture of a {}.',
    'a photo of the hard to see {}.', 'a low resolution photo of the {}.', 'a rendering of a {}.',
    'graffiti of a {}.', 'a bad photo of the {}.', 'a cropped photo of the {}.',
    'a tattoo of a {}.', 'the embroidered {}.', 'a photo of a hard to see {}.',
    'a bright photo of a {}.', 'a photo of a clean {}.', 'a photo of a dirty {}.',
    'a dark photo of the {}.', 'a drawing of a {}.', 'a photo of my {}.', 'the plastic {}.',
    'a photo of the cool {}.', 'a close-up photo of a {}.', 'a black and white photo of the {}.',
    'a painting of the {}.', 'a painting of a {}.', 'a pixelated photo of the {}.',
    'a sculpture of the {}.', 'a bright photo of the {}.', 'a cropped photo of a {}.',
    'a plastic {}.', 'a photo of the dirty {}.', 'a jpeg corrupted photo of a {}.',
    'a blurry photo of the {}.', 'a photo of the {}.', 'a good photo of the {}.',
    'a rendering of the {}.', 'a {} in a video game.', 'a photo of one {}.', 'a doodle of a {}.',
    'a close-up photo of the {}.', 'a photo of a {}.', 'the origami {}.',
    'the {} in a video game.', 'a sketch of a {}.', 'a doodle of the {}.', 'a origami {}.',
    'a low resolution photo of a {}.', 'the toy {}.', 'a rendition of the {}.',
    'a photo of the clean {}.', 'a photo of a large {}.', 'a rendition of a {}.',
    'a photo of a nice {}.', 'a photo of a weird {}.', 'a blurry photo of a {}.',
    'a cartoon {}.', 'art of a {}.', 'a sketch of the {}.', 'a embroidered {}.',
    'a pixelated photo of a {}.', 'itap of the {}.', 'a jpeg corrupted photo of the {}.',
    'a good photo of a {}.', 'a plushie {}.', 'a photo of the nice {}.',
    'a photo of the small {}.', 'a photo of the weird {}.', 'the cartoon {}.', 'art of the {}.',
    'a drawing of the {}.', 'a photo of the large {}.', 'a black and white photo of a {}.',
    'the plushie {}.', 'a dark photo of a {}.', 'itap of a {}.', 'graffiti of the {}.',
    'a toy {}.', 'itap of my {}.', 'a photo of a cool {}.', 'a photo of a small {}.',
    'a tattoo of the {}.',
)

CIFAR = (
    'a photo of a {}.', 'a blurry photo of a {}.', 'a black and white photo of a {}.',
    'a low contrast photo of a {}.', 'a high contrast photo of a {}.', 'a bad photo of a {}.',
    'a good photo of a {}.', 'a photo of a small {}.', 'a photo of a big {}.',
    'a photo of the {}.', 'a blurry photo of the {}.', 'a black and white photo of the {}.',
    'a low contrast photo of the {}.', 'a high contrast photo of the {}.',
    'a bad photo of the {}.', 'a good photo of the {}.', 'a photo of the small {}.',
    'a photo of the big {}.',
)

CALTECH101 = (
    'a photo of a {}.', 'a painting of a {}.', 'a plastic {}.', 'a sculpture of a {}.',
    'a sketch of a {}.', 'a tattoo of a {}.', 'a toy {}.', 'a rendition of a {}.',
    'a embroidered {}.', 'a cartoon {}.', 'a {} in a video game.', 'a plushie {}.',
    'a origami {}.', 'art of a {}.', 'graffiti of a {}.', 'a drawing of a {}.',
    'a doodle of a {}.', 'a photo of the {}.', 'a painting of the {}.', 'the plastic {}.',
    'a sculpture of the {}.', 'a sketch of the {}.', 'a tattoo of the {}.', 'the toy {}.',
    'a rendition of the {}.', 'the embroidered {}.', 'the cartoon {}.',
    'the {} in a video game.', 'the plushie {}.', 'the origami {}.', 'art of the {}.',
    'graffiti of the {}.', 'a drawing of the {}.', 'a doodle of the {}.',
)

PETS = ('a photo of a {}, a type of pet.',)

# The class name alone: for texts shaped like the training texts (e.g. the demo's
# held-out descriptions, 'a red star on a dark background').
IDENTITY = ('{}',)

TEMPLATE_SETS = {
    'imagenet': IMAGENET, 'cifar': CIFAR, 'caltech101': CALTECH101, 'pets': PETS,
    'identity': IDENTITY,
}

# The set CLIP used per TFDS dataset; others default to 'imagenet'.
DATASET_TEMPLATES = {
    'imagenet2012': 'imagenet', 'imagenet_v2': 'imagenet', 'imagenet_sketch': 'imagenet',
    'imagenet_a': 'imagenet', 'imagenet_r': 'imagenet', 'cifar10': 'cifar',
    'cifar100': 'cifar', 'caltech101': 'caltech101', 'oxford_iiit_pet': 'pets',
    'folder': 'identity',
}


def resolve(templates, dataset=None):
  """A template set by name, or one literal template containing '{}'; None picks the
  dataset's default (see DATASET_TEMPLATES)."""
  if templates is None or templates == '':
    base = (dataset or '').split('/')[0]
    templates = DATASET_TEMPLATES.get(base, 'imagenet')
  if templates in TEMPLATE_SETS:
    return TEMPLATE_SETS[templates]
  if isinstance(templates, str) and templates.count('{}') == 1:
    return (templates,)
  raise ValueError(f'Unknown templates {templates!r}: expected one of {sorted(TEMPLATE_SETS)} '
                   "or a single template containing '{}' once.")
