"""Prompt (prefix) caching at a model endpoint: a repeated prompt prefix is not computed again.

An entry per prefix key (a user, or a class) remembers how many prefix tokens are
cached and when it was last used; it lives `ttl_s` after its last use, as
providers' prompt caches do. A call whose prefix is at least `min_tokens` long
reads what is cached and writes the rest.
"""
from __future__ import annotations

from sim.config.schema import PromptCache


class PrefixCache:
    """The prompt cache of one endpoint."""

    def __init__(self, spec: PromptCache) -> None:
        self.spec = spec
        self.entries: dict[int, tuple[float, int]] = {}  # key -> (last use, cached tokens)

    def use(self, key: int, prefix: int, now: float) -> tuple[int, int]:
        """A call with a `prefix`-token prefix under `key` now: (tokens read from the cache, tokens written)."""
        if prefix < self.spec.min_tokens:
            return 0, 0
        entry = self.entries.get(key)
        cached = entry[1] if entry is not None and now - entry[0] <= self.spec.ttl_s else 0
        read = min(cached, prefix)
        self.entries[key] = (now, max(cached, prefix))
        return read, prefix - read
