"""Loaders for the dense datasets: the same samplers as classification (`cvt.data.EpochBatches` for training,
`cvt.data.ShardBatches` for evaluation), so a dense run shards over DDP processes and resumes mid-epoch the same
way, with each item's augmentation seeded by `mix_seed(seed, epoch, index)`."""

from __future__ import annotations

from collections.abc import Callable

from torch.utils.data import DataLoader, Dataset

from ..data import EpochBatches, ShardBatches, ignore_stop_signals


class DatasetEpochBatches(EpochBatches):
    """`EpochBatches` that also tells its dataset the epoch (for the per-item augmentation seed): one call,
    `loader.batch_sampler.set_epoch(epoch, start)`, sets up an epoch or its resumed remainder."""

    def __init__(self, dataset: Dataset, batch_size: int, rank: int, world: int, seed: int):
        super().__init__(len(dataset), batch_size, rank, world, seed)
        self.dataset = dataset

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        super().set_epoch(epoch, start)
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)


def build_loaders(train_set: Dataset | None, val_set: Dataset, *, collate: Callable, batch_size: int,
                  eval_batch_size: int, rank: int = 0, world: int = 1, seed: int = 0,
                  num_workers: int = 0) -> tuple[DataLoader | None, DataLoader]:
    """(training loader or None, validation loader). Training: this process's shuffled shard in full batches
    (`DatasetEpochBatches`); a training set whose `seed` is None takes `seed`, so its augmentation follows the
    run's. Validation: every world-th item in order (`ShardBatches`), unaugmented."""
    common = dict(collate_fn=collate, num_workers=num_workers,
                  worker_init_fn=ignore_stop_signals if num_workers else None)
    val = DataLoader(val_set, batch_sampler=ShardBatches(len(val_set), eval_batch_size, rank, world), **common)
    if train_set is None:
        return None, val
    if len(train_set) < batch_size * world:
        raise ValueError(f"the training split has {len(train_set)} images, fewer than one batch of "
                         f"{batch_size * world} ({world} process(es) x {batch_size}): lower --batch-size")
    if getattr(train_set, "seed", 0) is None:
        train_set.seed = seed
    batches = DatasetEpochBatches(train_set, batch_size, rank, world, seed)
    return DataLoader(train_set, batch_sampler=batches, **common), val
