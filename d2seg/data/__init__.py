"""Datasets (registered on import), loaders and mappers."""
from .builtin import register_all_builtin, shared_data_root
from .catalogs import prepare_dataset, register_shapes_catalogs, register_shapes_from_cfg
from .sem_seg_folder import load_sem_seg_folder, register_sem_seg_folder

register_all_builtin()
