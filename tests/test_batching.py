"""Length-bucketed batching: a deterministic permutation, less padding, exact resume, ranks that never overlap."""

from __future__ import annotations

import random

import pytest
import torch

from peftkit.batching import BatchOrder
from peftkit.checkpoint import TrainState
from peftkit.data import EncodedSplit
from peftkit.errors import PeftkitError
from peftkit.loop import Ranks

_RNG = random.Random(0)
LENGTHS = [_RNG.choice([3, 5, 8, 13, 21, 40, 64]) for _ in range(1003)]


def take(order: BatchOrder, state: TrainState, n: int) -> list[list[int]]:
    return [order.next(state) for _ in range(n)]


@pytest.mark.parametrize("batching", ["bucketed", "random"])
def test_every_epoch_is_a_permutation_and_the_same_for_the_same_seed(batching):
    order = BatchOrder(len(LENGTHS), 16, 0, Ranks(), LENGTHS, batching)
    state = TrainState()
    epoch0 = take(order, state, order.batches_per_epoch)
    assert sorted(i for b in epoch0 for i in b) == list(range(len(LENGTHS)))
    epoch1 = take(order, state, order.batches_per_epoch)
    assert state.epoch == 1 and epoch1 != epoch0
    again = BatchOrder(len(LENGTHS), 16, 0, Ranks(), LENGTHS, batching)
    assert take(again, TrainState(), order.batches_per_epoch) == epoch0
    other = BatchOrder(len(LENGTHS), 16, 1, Ranks(), LENGTHS, batching)
    assert take(other, TrainState(), order.batches_per_epoch) != epoch0


def test_bucketed_batches_pad_far_less_than_random_ones():
    bucketed = BatchOrder(len(LENGTHS), 32, 0, Ranks(), LENGTHS, "bucketed").padding_efficiency()
    plain = BatchOrder(len(LENGTHS), 32, 0, Ranks(), LENGTHS, "random").padding_efficiency()
    assert bucketed > 0.9 and plain < 0.5, (bucketed, plain)


def test_bucketed_batch_order_is_still_shuffled():
    order = BatchOrder(len(LENGTHS), 8, 0, Ranks(), LENGTHS, "bucketed")
    firsts = [LENGTHS[b[0]] for b in order.epoch_batches(0)[:40]]
    assert firsts != sorted(firsts) and firsts != sorted(firsts, reverse=True)


def test_resume_from_any_position_continues_with_the_same_batches():
    straight = BatchOrder(len(LENGTHS), 16, 3, Ranks(), LENGTHS, "bucketed")
    expected = take(straight, TrainState(), 150)  # past the end of epoch 0 (63 batches) into epoch 2
    for cut in (0, 1, 62, 63, 64, 100):
        state = TrainState()
        take(BatchOrder(len(LENGTHS), 16, 3, Ranks(), LENGTHS, "bucketed"), state, cut)
        resumed = BatchOrder(len(LENGTHS), 16, 3, Ranks(), LENGTHS, "bucketed")  # a fresh process
        restored = TrainState(epoch=state.epoch, batch_in_epoch=state.batch_in_epoch)
        assert take(resumed, restored, 150 - cut) == expected[cut:], cut


@pytest.mark.parametrize("world", [2, 3])
def test_ranks_take_disjoint_shards_of_the_same_length_bucket_and_the_same_number_of_steps(world):
    orders = [BatchOrder(len(LENGTHS), 8, 0, Ranks(r, world, r), LENGTHS, "bucketed") for r in range(world)]
    assert len({o.batches_per_epoch for o in orders}) == 1
    states = [TrainState() for _ in orders]
    per_rank = [take(o, s, o.batches_per_epoch) for o, s in zip(orders, states)]
    rows = [i for batches in per_rank for b in batches for i in b]
    assert len(rows) == len(set(rows)) == orders[0].batches_per_epoch * 8 * world  # no overlap, full batches only
    for step in range(orders[0].batches_per_epoch):
        assert all(len(per_rank[r][step]) == 8 for r in range(world))
        spread = [LENGTHS[i] for r in range(world) for i in per_rank[r][step]]
        assert max(spread) - min(spread) <= 43  # one bucket: never the whole 3..64 range in a chunk this size


def test_bucketing_needs_lengths():
    from peftkit.errors import PeftkitError

    with pytest.raises(PeftkitError, match="lengths"):
        BatchOrder(10, 2, 0, Ranks(), None, "bucketed")


def test_predictions_come_back_in_input_order_although_batched_by_length():
    from peftkit.inference import predict_logits

    class LastTokenAndLength(torch.nn.Module):
        def forward(self, input_ids, attention_mask, **_):
            n = attention_mask.sum(-1)
            last = input_ids.gather(1, (n - 1)[:, None])[:, 0]
            return type("Out", (), {"logits": torch.stack([last.float(), n.float()], -1)})()

    rows = [[7] * n + [100 + k] for k, n in enumerate(LENGTHS[:50])]
    split = EncodedSplit({"input_ids": rows}, None, pad_token_id=0)
    logits = predict_logits(LastTokenAndLength(), split, 8, torch.device("cpu"))
    assert logits[:, 0].tolist() == [100 + k for k in range(50)]
    assert logits[:, 1].tolist() == [n + 1 for n in LENGTHS[:50]]


def test_a_train_split_smaller_than_one_global_batch_is_refused_under_torchrun():
    """Fewer rows than batch x ranks kept one partial batch: the ranks got uneven shares (rank 1 a copy of rank 0's
    rows) and examples_seen counted rank 0's rows once per rank."""
    with pytest.raises(PeftkitError, match=r"fewer than one global batch .* lower train.batch_size to 5 or less"):
        BatchOrder(10, 8, 0, Ranks(0, 2, 0), list(range(1, 11)), "bucketed")
    assert BatchOrder(10, 5, 0, Ranks(1, 2, 1), list(range(1, 11)), "bucketed").batches_per_epoch == 1
