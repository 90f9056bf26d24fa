"""Datasets: the facts about each (``info``) and the pipeline that loads them."""
from .info import DATASETS, PAPER_TAGS, DatasetInfo, get_dataset_info
from .datasets import ADAPTERS, DataSplits, DatasetNotFoundError, RawSplits, build_datasets, paper_split
from .transforms import build_transform
