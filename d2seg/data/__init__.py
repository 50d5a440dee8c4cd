"""Datasets (registered on import), loaders, mappers and checks."""
from .build import build_mapper, build_test_loader, build_train_loader
from .builtin import register_all_builtin, shared_data_root
from .catalogs import prepare_dataset, register_shapes_catalogs, register_shapes_from_cfg
from .errors import BadInputError, DatasetLoadError
from .image_io import install as _install_image_reader
from .image_io import read_image
from .register import register_dataset, register_datasets_from_cfg
from .sem_seg_folder import load_sem_seg_folder, register_sem_seg_folder
from .sem_seg_mapper import SemSegDatasetMapper, build_sem_seg_augmentation
from .sem_seg_sampler import build_sem_seg_repeat_sampler, repeat_factors_from_sem_seg
from .sem_seg_transforms import ForegroundCenteredCrop, RandomRot90, Rot90Transform

_install_image_reader()  # 16-bit / float images scaled, not clipped (image_io.py)
register_all_builtin()
