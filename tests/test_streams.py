"""Named streams and BlockSampler: a sampler hands out its stream's draws in order, a block at a time."""
from __future__ import annotations

import numpy as np

from sim.model.streams import BlockSampler, Streams


def test_block_sampler_hands_out_blocks_in_order_and_draws_only_when_one_runs_out():
    calls = []

    def draw(rng: np.random.Generator, n: int) -> np.ndarray:
        calls.append(n)
        return rng.random(n)

    sampler = BlockSampler(draw, Streams(3).rng("x"), block=4)
    assert calls == []  # nothing is drawn before the first call
    got = [sampler() for _ in range(10)]
    assert calls == [4, 4, 4]  # the third block was drawn for the 9th call, not before
    rng = Streams(3).rng("x")
    expected = np.concatenate([rng.random(4) for _ in range(3)])[:10].tolist()
    assert got == expected and all(type(x) is float for x in got)


def test_same_name_same_stream_other_name_or_replication_other_stream():
    a = BlockSampler(lambda rng, n: rng.random(n), Streams(1, 0).rng("class.chat.arrivals"))
    b = BlockSampler(lambda rng, n: rng.random(n), Streams(1, 0).rng("class.chat.arrivals"))
    c = BlockSampler(lambda rng, n: rng.random(n), Streams(1, 1).rng("class.chat.arrivals"))
    d = BlockSampler(lambda rng, n: rng.random(n), Streams(1, 0).rng("class.chat.prompt"))
    first = [a() for _ in range(5)]
    assert first == [b() for _ in range(5)]
    assert first != [c() for _ in range(5)] and first != [d() for _ in range(5)]
