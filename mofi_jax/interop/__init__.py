"""Checkpoint interop: Hugging Face CLIP folders and TF SavedModels.

  clip_config     our config.model <-> CLIPConfig; what CLIPModel cannot express
  clip_params     our Flax parameters <-> a CLIPModel state dict (both directions)
  clip_files      reading and writing safetensors weights (never pickle)
  clip_tokenizer  tokenizers across the boundary, and where the text tower pools
  outputs         output folders: written aside, renamed when complete
  hf_export       a training checkpoint -> a CLIPModel folder (+ the entity head)
  open_clip_export  a training checkpoint -> an open_clip `local-dir:` folder
  clip_benchmark_data, clip_benchmark_cli
                  our eval folders in CLIP_benchmark's layout; its CLI beside NumPy 2.4
  hf_import       a CLIPModel folder -> an inference.Encoder, or training init
  savedmodel      the image and text encoders -> a TF SavedModel (jax2tf)

Only safetensors and Orbax files are ever read: never pickle (see docs/interop.md).
"""
