"""Train/test data loaders for d2seg's trainer: detectron2's builders plus d2seg's mappers.

* ``cfg.INPUT.DATASET_MAPPER_NAME``: "" = detectron2's ``DatasetMapper``; "sem_seg" =
  :class:`d2seg.data.sem_seg_mapper.SemSegDatasetMapper` (train and test).
* ``cfg.DATALOADER.SAMPLER_TRAIN``: detectron2's samplers, plus
  "SemSegRepeatFactorTrainingSampler" (repeat factors from label-map class frequencies).
"""
from __future__ import annotations

import itertools
import logging
import random
from typing import Callable, Dict, Iterable, Iterator, List

import numpy as np
import torch

from torch.utils.data import Sampler

from detectron2.data import (
    DatasetMapper,
    build_detection_test_loader,
    build_detection_train_loader,
    get_detection_dataset_dicts,
)
from detectron2.data.samplers import (
    RandomSubsetTrainingSampler,
    RepeatFactorTrainingSampler,
    TrainingSampler,
)
from detectron2.config import CfgNode
from detectron2.utils import comm

from .pack import PackedBatchCollator, PackedMapper
from .safe_mapper import SafeMapper

logger = logging.getLogger(__name__)

__all__ = ["build_train_loader", "build_test_loader", "build_mapper", "MAPPER_NAMES",
           "SkipSampler", "PositionSeededMapper"]

MAPPER_NAMES = ("", "sem_seg")
SEM_SEG_REPEAT_SAMPLER = "SemSegRepeatFactorTrainingSampler"


def build_mapper(cfg: CfgNode, is_train: bool) -> Callable[[Dict], Dict]:
    """The mapper named by ``cfg.INPUT.DATASET_MAPPER_NAME``."""
    name = cfg.INPUT.DATASET_MAPPER_NAME
    if name == "":
        return _ImageFileMapper(DatasetMapper(cfg, is_train))
    if name == "sem_seg":
        from .sem_seg_mapper import SemSegDatasetMapper

        return SemSegDatasetMapper(cfg, is_train)
    raise ValueError(f"INPUT.DATASET_MAPPER_NAME '{name}' is not one of {MAPPER_NAMES}")


class _ImageFileMapper:
    """detectron2's ``DatasetMapper``, reading each dict's image under
    :func:`~d2seg.data.image_io.mapping_image`: a grey model's ("L") 16-bit images are scaled
    as d2seg's semantic mapper and ``predict.py`` scale them, not clipped, while the label maps
    it also reads as "L" stay the stored ids."""

    def __init__(self, mapper: Callable[[Dict], Dict]):
        self.mapper = mapper

    def __call__(self, dataset_dict: Dict) -> Dict:
        from .image_io import mapping_image

        with mapping_image(dataset_dict.get("file_name", "")):
            return self.mapper(dataset_dict)

    def __getattr__(self, name: str):  # is_train, augmentations, ... of the wrapped mapper
        if "mapper" not in self.__dict__:  # (while unpickling)
            raise AttributeError(name)
        return getattr(self.__dict__["mapper"], name)


class SkipSampler(Sampler):
    """Yield ``sampler``'s (infinite) index stream without its first ``skip`` indices.

    A resumed run rebuilds its sampler from the same seed; skipping the indices the first
    ``start_iter`` iterations consumed makes it continue the same data order. detectron2
    shards the stream among data-loader workers in chunks of one batch. Without aspect-ratio
    grouping each worker collates its chunk, so batch ``k`` is always indices
    ``[k*B, (k+1)*B)`` of this rank's stream, for any number of workers. With
    ``DATALOADER.ASPECT_RATIO_GROUPING`` the workers hand out single samples in turn and the
    training process groups them by aspect ratio: the first ``k*B`` indices are exactly the
    ones consumed only when ``k`` is a multiple of the number of workers and no group was left
    partly filled (images of one orientation), so a resume elsewhere continues from the same
    place in the stream but may batch a few images differently.
    """

    def __init__(self, sampler: Sampler, skip: int):
        self.sampler, self.skip = sampler, int(skip)

    def __iter__(self) -> Iterator[int]:
        return itertools.islice(iter(self.sampler), self.skip, None)


class PositionSeededMapper:
    """Seed the python, numpy and torch (CPU) RNGs before each sample from (seed, rank,
    stream position).

    The random augmentations of a sample then depend on where it sits in this rank's sampler
    stream, not on the data-loader worker's RNG history, so a resumed run (which restarts its
    workers) applies the same augmentations as the uninterrupted run. Positions follow
    detectron2's worker sharding: chunks of ``batch_size`` indices, round-robin over workers.
    """

    def __init__(self, mapper: Callable, seed: int, batch_size: int, start: int = 0):
        self.mapper, self.seed, self.batch, self.start = mapper, int(seed), int(batch_size), start
        self.rank = comm.get_rank()
        self.count = 0  # samples mapped by this process (each worker has its own copy)

    def __call__(self, dataset_dict):
        info = torch.utils.data.get_worker_info()
        w, n = (info.id, info.num_workers) if info is not None else (0, 1)
        k = self.count
        self.count += 1
        pos = self.start + ((k // self.batch) * n + w) * self.batch + k % self.batch
        s = int(np.random.SeedSequence([self.seed, self.rank, pos]).generate_state(1)[0])
        if info is None:  # in the training process itself: leave its RNG streams untouched
            saved = (random.getstate(), np.random.get_state(), torch.get_rng_state())
        random.seed(s)
        np.random.seed(s)
        # The CPU generator only: mappers draw on the CPU, and torch.manual_seed would also
        # queue a lazy CUDA seeding, which formats the call stack each time (10-17 % of the
        # shapes loaders' time per batch, ~0.5 ms a sample).
        torch.default_generator.manual_seed(s)
        try:
            return self.mapper(dataset_dict)
        finally:
            if info is None:
                random.setstate(saved[0])
                np.random.set_state(saved[1])
                torch.set_rng_state(saved[2])


def _build_sampler(cfg, dataset) -> Sampler:
    """detectron2's ``DATALOADER.SAMPLER_TRAIN`` choice (plus d2seg's semantic repeat-factor
    sampler), seeded with ``cfg.SEED`` rather than a fresh random draw so that a resumed run
    rebuilds the same index stream."""
    name = cfg.DATALOADER.SAMPLER_TRAIN
    seed = cfg.SEED if cfg.SEED >= 0 else None
    if name == "TrainingSampler":
        return TrainingSampler(len(dataset), seed=seed)
    if name == "RepeatFactorTrainingSampler":
        factors = RepeatFactorTrainingSampler.repeat_factors_from_category_frequency(
            dataset, cfg.DATALOADER.REPEAT_THRESHOLD, sqrt=cfg.DATALOADER.REPEAT_SQRT)
        return RepeatFactorTrainingSampler(factors, seed=seed)
    if name == "RandomSubsetTrainingSampler":
        ratio = cfg.DATALOADER.RANDOM_SUBSET_RATIO
        if not 0.0 < ratio <= 1.0:
            raise ValueError(f"DATALOADER.RANDOM_SUBSET_RATIO must be in (0, 1], got {ratio}")
        return RandomSubsetTrainingSampler(len(dataset), ratio,
                                           seed_shuffle=seed, seed_subset=seed)
    if name == SEM_SEG_REPEAT_SAMPLER:
        from .sem_seg_sampler import build_sem_seg_repeat_sampler

        return build_sem_seg_repeat_sampler(cfg, dataset)
    raise ValueError(f"DATALOADER.SAMPLER_TRAIN '{name}' is not one of TrainingSampler, "
                     f"RepeatFactorTrainingSampler, RandomSubsetTrainingSampler, "
                     f"{SEM_SEG_REPEAT_SAMPLER}")


def build_train_loader(cfg: CfgNode, start_iter: int = 0) -> Iterable[List[Dict]]:
    """detectron2's train loader with

    * the mapper named by ``cfg.INPUT.DATASET_MAPPER_NAME``, wrapped in
      :class:`~d2seg.data.safe_mapper.SafeMapper` (``D2SEG.BAD_INPUT``) and
      :class:`PositionSeededMapper` (augmentations reproducible across resumes);
    * the sampler of ``DATALOADER.SAMPLER_TRAIN`` (detectron2's, or
      "SemSegRepeatFactorTrainingSampler"), seeded with ``SEED``;
    * ``start_iter > 0`` (resuming): the sampler skips the indices of the iterations already
      trained (:class:`SkipSampler`);
    * ``D2SEG.SPEED.PIN_MEMORY`` / ``PERSISTENT_WORKERS`` / ``PREFETCH_FACTOR`` passed on to
      ``torch.utils.data.DataLoader`` (:func:`d2seg.engine.fast_paths.loader_kwargs`);
    * ``D2SEG.SPEED.SHARING_STRATEGY``: how the workers share tensors with this process
      (:func:`d2seg.engine.fast_paths.apply_sharing_strategy`);
    * ``D2SEG.SPEED.PACK_SAMPLES``: each sample's tensors made views of one buffer in the
      worker (:func:`d2seg.data.pack.pack_sample`: one shared-memory block per sample); with
      ``DATALOADER.ASPECT_RATIO_GROUPING`` off the workers collate whole batches, and each
      batch is one block (:func:`d2seg.data.pack.pack_batch`);
    * ``D2SEG.SPEED.DEVICE_PREFETCH``: the loader wrapped in
      :class:`~d2seg.data.prefetch.DevicePrefetcher` (batches copied to ``MODEL.DEVICE`` by a
      background thread while the previous step runs).
    """
    from detectron2.data.build import _train_loader_from_config

    filter_empty = cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS
    if cfg.DATALOADER.SAMPLER_TRAIN == SEM_SEG_REPEAT_SAMPLER:
        filter_empty = False
    dataset = get_detection_dataset_dicts(
        cfg.DATASETS.TRAIN, filter_empty=filter_empty,
        min_keypoints=cfg.MODEL.ROI_KEYPOINT_HEAD.MIN_KEYPOINTS_PER_IMAGE
        if cfg.MODEL.KEYPOINT_ON else 0,
        proposal_files=cfg.DATASETS.PROPOSAL_FILES_TRAIN if cfg.MODEL.LOAD_PROPOSALS else None,
    )
    sampler = _build_sampler(cfg, dataset)
    per_rank = cfg.SOLVER.IMS_PER_BATCH // comm.get_world_size()
    mapper = SafeMapper(build_mapper(cfg, True), cfg.D2SEG.BAD_INPUT.POLICY,
                        cfg.D2SEG.BAD_INPUT.MAX_SKIPS, num_inputs=len(dataset))
    mapper = PositionSeededMapper(mapper, max(cfg.SEED, 0), per_rank, start_iter * per_rank)
    from ..engine.fast_paths import apply_sharing_strategy, loader_kwargs, resolve

    plan = resolve(cfg)
    apply_sharing_strategy(plan)
    # without aspect-ratio grouping detectron2 collates each batch in a worker: pack batches
    batch_pack = plan.pack_samples and not cfg.DATALOADER.ASPECT_RATIO_GROUPING
    if plan.pack_samples and not batch_pack:
        mapper = PackedMapper(mapper)
    # the remaining arguments as build_detection_train_loader(cfg) derives them
    kwargs = _train_loader_from_config(cfg, mapper=mapper, dataset=dataset, sampler=sampler)
    if batch_pack:
        kwargs["collate_fn"] = PackedBatchCollator()
    # D2SEG.SPEED: pin_memory / persistent_workers / prefetch_factor (d2seg/engine/fast_paths.py)
    kwargs.update(loader_kwargs(cfg, plan))
    if start_iter > 0:
        kwargs["sampler"] = SkipSampler(sampler, start_iter * per_rank)
    loader = build_detection_train_loader(**kwargs)
    if not plan.device_prefetch and cfg.DATALOADER.NUM_WORKERS == 0 and \
            str(cfg.D2SEG.SPEED.DEVICE_PREFETCH).lower() in ("on", "true", "1"):
        # resolve() leaves it off: the mapper would run in the prefetch thread
        logger.warning("D2SEG.SPEED.DEVICE_PREFETCH is left off: it needs "
                       "DATALOADER.NUM_WORKERS > 0 (with 0 the augmentations would run in its "
                       "thread, and their seeded random state would mix with the training "
                       "step's)")
    if plan.device_prefetch:
        from .prefetch import DevicePrefetcher

        device = cfg.MODEL.DEVICE if plan.device == "cuda" else "cpu"
        loader = DevicePrefetcher(loader, device, plan.device_prefetch_depth)
    return loader


def build_test_loader(cfg: CfgNode, dataset_name: str) -> torch.utils.data.DataLoader:
    """detectron2's test loader for ``dataset_name`` with the configured mapper."""
    return build_detection_test_loader(cfg, dataset_name, mapper=build_mapper(cfg, False))
