"""The loop's data order: deterministic from the seed, resumable from (epoch, batch_in_epoch), sharded by rank.

`bucketed` (the default) shuffles the rows, cuts them into chunks of `CHUNK_BATCHES` global batches, sorts each
chunk by length, cuts it into batches and shuffles the order of those batches: every batch holds rows of about
the same length, so dynamic padding adds little, while the data order stays random from batch to batch.
`random` is a plain permutation cut into batches.

Under torchrun a global batch holds `batch_size` rows per rank and rank r takes the r-th slice, so ranks never
overlap, each sees rows of the same length bucket, and every rank takes the same number of steps.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Literal

import torch

from peftkit.errors import PeftkitError

if TYPE_CHECKING:  # the loop's state, for its type only
    from peftkit.checkpoint import TrainState

Batching = Literal["bucketed", "random"]
CHUNK_BATCHES = 50  # global batches per sorted chunk: long enough to bucket well, short enough to stay random


class BatchOrder:
    """A deterministic, resumable data order: epoch e is drawn from a generator seeded by (seed, e).

    The position (epoch, batch_in_epoch) lives in the loop's TrainState, so a resumed run continues with the next
    batch; nothing else needs saving because each epoch's batches are recomputed from the seed.
    """

    def __init__(
        self,
        num_rows: int,
        batch_size: int,
        seed: int,
        ranks,
        lengths: list[int] | None = None,
        batching: Batching = "random",
    ):
        if num_rows == 0:
            raise PeftkitError("the train split is empty")
        if batching == "bucketed" and lengths is None:
            raise PeftkitError("bucketed batching needs the rows' lengths")
        self.num_rows, self.batch_size, self.seed, self.ranks = num_rows, batch_size, seed, ranks
        self.lengths, self.batching = lengths, batching
        self.global_batch = batch_size * ranks.world
        if ranks.world > 1 and num_rows < self.global_batch:  # ranks would get uneven shares, or copies of rows
            fits = num_rows // ranks.world
            lower = f"lower train.batch_size to {fits} or less, or " if fits else ""
            raise PeftkitError(
                f"the train split has {num_rows} rows, fewer than one global batch (train.batch_size {batch_size} "
                f"x {ranks.world} processes = {self.global_batch}); {lower}run fewer processes"
            )
        # one process keeps the last partial batch; several drop it so every rank steps together
        if ranks.world == 1:
            self.batches_per_epoch = math.ceil(num_rows / self.global_batch)
        else:
            self.batches_per_epoch = num_rows // self.global_batch
        self._epoch, self._batches = None, None

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        """The global batches of `epoch`, in the order the loop takes them."""
        generator = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        perm = torch.randperm(self.num_rows, generator=generator).tolist()
        size = self.global_batch
        if self.batching == "random":
            batches = [perm[i : i + size] for i in range(0, len(perm), size)]
        else:
            batches = []
            step = size * CHUNK_BATCHES
            for c in range(0, len(perm), step):  # a stable sort keeps the shuffled order among equal lengths
                chunk = sorted(perm[c : c + step], key=self.lengths.__getitem__)
                batches.extend(chunk[i : i + size] for i in range(0, len(chunk), size))
            # only the very last batch can be partial; keep it last so torchrun's drop of it stays exact
            full, tail = [b for b in batches if len(b) == size], [b for b in batches if len(b) < size]
            shuffle = torch.randperm(len(full), generator=generator).tolist()
            batches = [full[i] for i in shuffle] + tail
        if self.ranks.world > 1 and len(batches[-1]) < size:  # __init__ ensured one full batch at least
            batches = batches[:-1]  # the partial batch: ranks could not split it evenly
        return batches[: self.batches_per_epoch]

    def next(self, state: TrainState) -> list[int]:
        """This rank's rows of the next micro-batch; advances state.epoch / state.batch_in_epoch."""
        if state.batch_in_epoch >= self.batches_per_epoch:
            state.epoch, state.batch_in_epoch = state.epoch + 1, 0
        if self._epoch != state.epoch:
            self._batches, self._epoch = self.epoch_batches(state.epoch), state.epoch
        batch = self._batches[min(state.batch_in_epoch, len(self._batches) - 1)]
        state.batch_in_epoch += 1
        start = self.ranks.rank * self.batch_size
        return batch[start : start + self.batch_size]

    def step_batches(self, state: TrainState, accum: int) -> list[list[int]]:
        """This rank's micro-batches for the next optimizer step: `accum` of them, or the fewer left in the epoch.

        Why: an accumulation never spans two epochs (as in HF's Trainer), so an epoch is exactly
        ceil(batches_per_epoch / accum) steps, `train.epochs` trains each row that many times, and an evaluation
        every epoch falls on the epoch's end.
        """
        left = self.batches_per_epoch - state.batch_in_epoch
        if left <= 0:  # the epoch is done: `next` starts the next one, with all its batches left
            left = self.batches_per_epoch
        return [self.next(state) for _ in range(min(accum, left))]

    def padding_efficiency(self, epoch: int = 0) -> float:
        """Real tokens / padded tokens over one epoch's batches (needs lengths)."""
        if self.lengths is None:
            return float("nan")
        real = padded = 0
        for batch in self.epoch_batches(epoch):
            for r in range(self.ranks.world):
                rows = batch[r * self.batch_size : (r + 1) * self.batch_size]
                if rows:
                    lengths = [self.lengths[i] for i in rows]
                    real, padded = real + sum(lengths), padded + max(lengths) * len(lengths)
        return real / max(padded, 1)


def first_batches(split, batch_size: int):
    """n -> the first n batches of `split` (the same every run), for methods that read data when applied."""
    from peftkit.data import collate

    def batches(n: int) -> list[dict[str, torch.Tensor]]:
        starts = range(0, min(n * batch_size, len(split)), batch_size)
        return [collate(split, list(range(i, min(i + batch_size, len(split))))) for i in starts]

    return batches
