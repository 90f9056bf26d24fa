"""Datasets: the facts about each (``info``) and the pipeline that loads them."""
from .info import DATASETS, TINY_IMAGENET_WNIDS, DatasetInfo, get_dataset_info
from .datasets import (
    ADAPTERS, PROTOCOLS, ArrayImageDataset, DataSplits, DatasetNotFoundError, RawSplits, TransformedDataset,
    build_datasets, dataset_info, held_in_memory, loader_workers, paper_split, register_adapter)
from .transforms import AUGMENTATIONS, build_transform, resolve_info
# Importing the loaders registers them in ADAPTERS.
from .folder import (
    FolderSummary, ImageFileDataset, ImageGeometry, PixelScale, UnreadableImageError, check_image_folder,
    held_bytes_bound, load_image, sample_geometry)
from .adapters import SOURCES, Source
