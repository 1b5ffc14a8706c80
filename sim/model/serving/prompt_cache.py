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

    __slots__ = ("spec", "entries", "_min_tokens", "_ttl")

    def __init__(self, spec: PromptCache) -> None:
        self.spec = spec
        self.entries: dict[int, tuple[float, int]] = {}  # key -> (last use, cached tokens)
        self._min_tokens, self._ttl = spec.min_tokens, spec.ttl_s  # read on every model call

    def use(self, key: int, prefix: int, now: float) -> tuple[int, int]:
        """A call with a `prefix`-token prefix under `key` now: (tokens read from the cache, tokens written)."""
        if prefix < self._min_tokens:
            return 0, 0
        entries = self.entries
        entry = entries.get(key)
        if entry is None or now - entry[0] > self._ttl:  # nothing cached, or expired: write it all
            entries[key] = (now, prefix)
            return 0, prefix
        cached = entry[1]
        if cached >= prefix:  # all of it cached: read it, and keep the longer prefix cached
            entries[key] = (now, cached)
            return prefix, 0
        entries[key] = (now, prefix)  # a longer prefix than cached: read what is, write the rest
        return cached, prefix - cached
