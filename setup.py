"""ddep: denoising pretraining for semantic segmentation (Brempong et al., 2022)."""

import setuptools

# Pinned to a set that is known to work together on Python 3.11 (CPU wheels);
# on accelerators install the matching jax[cuda]/jax[tpu] over these.
INSTALL_REQUIRES = [
    'absl-py>=2.1',
    'clu==0.0.12',
    'flax==0.12.8',
    'jax==0.10.2',
    'jaxlib==0.10.2',
    'ml-collections==1.1.0',
    'numpy>=1.26',
    # ddep.reporting.paired_stats: Student-t quantiles for the demo's paired intervals.
    'scipy>=1.11',
    'optax==0.2.8',
    'orbax-checkpoint==0.12.8',
    # ddep.runs.storage: one path layer for local and gs:// workdirs (orbax and TFDS use it too).
    'etils[epath]>=1.7',
    # orbax asks the GCS API whether a gs:// bucket has a hierarchical namespace
    # before it lists checkpoint steps, and imports this client to do so.
    'google-cloud-storage>=2.14',
    'safetensors>=0.4',
    'pillow>=10',
    'matplotlib>=3.8',
    # tf.data and TFDS run on the host CPU only.
    'tensorflow-cpu==2.21.0',
    'tensorflow-datasets==4.9.10',
    # clu's summary writer imports tensorboard; TFDS on 3.11 imports
    # importlib_resources without declaring it.
    'tensorboard==2.21.0',
    'importlib_resources>=6',
]

setuptools.setup(
    name='ddep',
    version='0.1.0',
    description='Denoising pretraining (DeP, DDeP) for semantic segmentation in JAX/Flax.',
    packages=setuptools.find_packages(include=['ddep', 'ddep.*']),
    python_requires='>=3.11',
    install_requires=INSTALL_REQUIRES,
    extras_require={
        # gcp-storage-emulator: a GCS API on 127.0.0.1 for the gs:// workdir tests;
        # pyink: the formatter scripts/test.sh checks (pinned: its output is the style).
        'test': [
            'pytest>=8',
            'pytest-xdist>=3.5',
            'gcp-storage-emulator>=2024.1',
            'pyink==26.5.1',
        ],
    },
)
