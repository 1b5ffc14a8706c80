"""A replica's automatic prefix cache over prompt block ids (vLLM's automatic prefix caching).

Replayed traces that carry prompt block ids (Mooncake's hash_ids: equal ids
are a shared prefix, each id standing for `block_tokens` tokens) tell which
prompts share a prefix. A replica keeps the KV of the blocks it has seen, least
recently used first out; an admitted prompt skips the prefill of its leading
blocks found there. Ids hash a block together with everything before it, so a
hit needs every earlier block to hit too: only the leading run counts.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Sequence

from sim.config.schema import BlockPrefixCache


class BlockCache:
    """The prefix cache of one replica: an LRU of block ids."""

    def __init__(self, spec: BlockPrefixCache) -> None:
        self.capacity = spec.blocks
        self.block_tokens = spec.block_tokens
        self._blocks: OrderedDict[int, None] = OrderedDict()

    def leading_hits(self, ids: Sequence[int]) -> int:
        """How many of a prompt's leading blocks are cached (nothing changes)."""
        blocks = self._blocks
        hits = 0
        for block in ids:
            if block not in blocks:
                break
            hits += 1
        return hits

    def admit(self, ids: Sequence[int]) -> int:
        """A prompt with these block ids is admitted: returns how many of its leading blocks were cached.

        Its blocks then become the most recently used (the new ones are computed now).
        """
        hits = self.leading_hits(ids)
        blocks = self._blocks
        for block in ids:
            if block in blocks:
                blocks.move_to_end(block)
            else:
                blocks[block] = None
        while len(blocks) > self.capacity:
            blocks.popitem(last=False)
        return hits

    def __len__(self) -> int:
        return len(self._blocks)
