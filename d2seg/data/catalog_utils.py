"""Small helpers around detectron2's catalogs."""
from detectron2.data import DatasetCatalog, MetadataCatalog

__all__ = ["unregister"]


def unregister(name: str) -> None:
    """Remove ``name`` from DatasetCatalog and MetadataCatalog if present (before re-registering)."""
    if name in DatasetCatalog.list():
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
