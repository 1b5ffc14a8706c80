"""Named random streams, spawned from one root seed.

Every component draws from its own stream, named after what it draws
("class.chat.arrivals", "endpoint.llama8b.service"). A stream's seed depends on
the root seed, the replication and its name only, so adding a class or an
endpoint never shifts another stream, and two configs run with the same seed see
the same traffic (common random numbers).
"""
from __future__ import annotations

import zlib
from functools import partial
from itertools import chain
from typing import Callable, Iterator

import numpy as np

from sim.config.base import MAX_TOKENS

BLOCK = 2048  # draws per refill: large enough to amortise numpy's call overhead


class Streams:
    """Factory of named numpy Generators for one replication."""

    def __init__(self, seed: int, replication: int = 0) -> None:
        self.seed = seed
        self.replication = replication

    def rng(self, name: str) -> np.random.Generator:
        """The Generator of stream `name` (a fresh one at the same state on every call)."""
        # crc32, not hash(): Python salts str hashes per process.
        key = (self.replication, zlib.crc32(name.encode()))
        return np.random.Generator(np.random.PCG64(np.random.SeedSequence(self.seed, spawn_key=key)))


class BlockSampler(partial):
    """Hands out one draw at a time from vectorised blocks of `draw(rng, n)`.

    `sampler()` is `next()` on an endless chain of blocks of `block` draws, each
    drawn when the one before runs out: the stream is consumed exactly as a
    refill-on-empty loop would. It is a `functools.partial` of `next` so that a
    draw, made a few hundred thousand times a run, costs no Python frame.
    """

    __slots__ = ()

    def __new__(cls, draw: Callable[[np.random.Generator, int], np.ndarray], rng: np.random.Generator,
                block: int = BLOCK) -> "BlockSampler":
        def blocks() -> Iterator[list]:
            while True:
                yield draw(rng, block).tolist()

        return super().__new__(cls, next, chain.from_iterable(blocks()))


def uniform01(rng: np.random.Generator, n: int) -> np.ndarray:
    """n uniform draws on [0, 1): the chance draws of yes/no decisions."""
    return rng.random(n)


def token_draw(spec) -> Callable[[np.random.Generator, int], np.ndarray]:
    """Integer token counts from a distribution spec: rounded, at least 1."""

    def draw(rng: np.random.Generator, n: int) -> np.ndarray:
        # Clipped at MAX_TOKENS: a far tail of a wide distribution must not overflow int64.
        return np.clip(np.rint(spec.sample(rng, n)), 1, MAX_TOKENS).astype(np.int64)

    return draw
