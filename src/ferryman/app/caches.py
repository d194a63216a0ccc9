"""The config proxy's caches: an :class:`~ferryman.cache.http_cache.HttpCache` per route
``cache`` block, over storages shared where the config names the same place.

Each route gets its own memory storage. Routes naming the same disk directory share one
:class:`~ferryman.cache.disk.DiskStorage` (bounded by the largest ``max_size`` among
them), and routes naming the same Redis URL share one
:class:`~ferryman.cache.redis_storage.RedisStorage`.
"""

from __future__ import annotations

import ipaddress
import logging
import os

from ferryman.cache.http_cache import HttpCache
from ferryman.cache.memory import MemoryStorage
from ferryman.cache.purge_log import PurgeLog
from ferryman.cache.storage import CacheStorage
from ferryman.config.model import CacheConfig

__all__ = ["CacheRegistry"]

log = logging.getLogger("ferryman.cache")

#: The largest Redis entry when ``max_entry`` is not set.
REDIS_MAX_ENTRY = 16 * 1024 * 1024


class CacheRegistry:
    """Builds the caches of one config, sharing storages between routes."""

    def __init__(self, configs: list[tuple[CacheConfig, str]]) -> None:
        """Prepare for ``configs``, every cache block of the config with its route's
        name (the largest bound of a shared disk directory, and which names repeat
        among the routes sharing a storage, are known before any storage is made)."""
        self._disk_sizes: dict[str, int] = {}
        self._names: dict[tuple[tuple[str, str], str], int] = {}
        for config, name in configs:
            if config.storage == "disk" and config.path is not None:
                size = self._disk_sizes.get(config.path, 0)
                self._disk_sizes[config.path] = max(size, config.max_size)
            place = _place(config)
            if place is not None:
                self._names[(place, name)] = self._names.get((place, name), 0) + 1
        self._shared: dict[tuple[str, str], CacheStorage] = {}
        #: Every storage made, for closing.
        self.storages: list[CacheStorage] = []
        #: Every cache made.
        self.caches: list[HttpCache] = []

    def _storage(self, config: CacheConfig) -> CacheStorage:
        if config.storage == "memory":
            storage: CacheStorage = MemoryStorage(config.max_size, max_entry=config.max_entry)
            self.storages.append(storage)
            return storage
        if config.storage == "disk":
            assert config.path is not None
            place = ("disk", config.path)
            found = self._shared.get(place)
            if found is None:
                from ferryman.cache.disk import DiskStorage

                found = DiskStorage(
                    config.path, self._disk_sizes[config.path], max_entry=config.max_entry
                )
                self._shared[place] = found
                self.storages.append(found)
            return found
        assert config.redis is not None
        place = ("redis", config.redis)
        found = self._shared.get(place)
        if found is None:
            from ferryman.cache.redis_storage import RedisStorage

            found = RedisStorage(config.redis, max_entry=config.max_entry or REDIS_MAX_ENTRY)
            self._shared[place] = found
            self.storages.append(found)
        return found

    def cache(self, config: CacheConfig, scope: str = "", name: str = "") -> HttpCache:
        """The cache of one route's ``cache`` block; ``scope`` names it in the purge log
        (the listener and route). The keys and tags of a disk or Redis storage begin with
        the route's ``name`` (its listener too when two listeners' routes of that name
        share the storage): routes sharing a storage keep apart, and servers sharing a
        Redis share the entries of their routes of the same name."""
        place = _place(config)
        namespace = b""
        if place is not None:
            namespace = (name if self._names[(place, name)] == 1 else scope).encode()
        purge = None
        if config.purge is not None:
            purge = tuple(ipaddress.ip_network(n, strict=False) for n in config.purge)
        cache = HttpCache(
            self._storage(config),
            default_ttl=config.default_ttl,
            key=config.key,
            ignore=frozenset(config.ignore),
            stale_while_revalidate=config.stale_while_revalidate,
            stale_if_error=config.stale_if_error,
            lock_timeout=config.lock_timeout,
            purge_from=purge,
            status_header=config.status_header,
            scope=scope.encode(),
            namespace=namespace,
        )
        self.caches.append(cache)
        return cache

    async def close(self) -> None:
        """Close every storage (their connections and files)."""
        for storage in self.storages:
            try:
                await storage.close()
            except Exception:  # noqa: BLE001 - closing must not fail a worker
                log.warning("closing a cache storage failed", exc_info=True)

    def hand_over(self, uid: int | None, gid: int | None) -> None:
        """Give the disk caches' directories to the account the workers run as
        (``server.user``/``group``), when the main process made them as another."""
        if (uid is None and gid is None) or os.geteuid() != 0:
            return
        from ferryman.cache.disk import DiskStorage

        for storage in self.storages:
            if isinstance(storage, DiskStorage) and os.path.isdir(storage.path):
                _chown_tree(storage.path, -1 if uid is None else uid, -1 if gid is None else gid)

    def attach_purge_log(self, log: PurgeLog | None) -> None:
        """Share the purges of per-worker (memory) caches through ``log``."""
        for cache in self.caches:
            cache.attach_purge_log(log)


def _place(config: CacheConfig) -> tuple[str, str] | None:
    """Where a shared storage lives, or None for a memory one."""
    if config.storage == "disk" and config.path is not None:
        return ("disk", config.path)
    if config.storage == "redis" and config.redis is not None:
        return ("redis", config.redis)
    return None


def _chown_tree(root: str, uid: int, gid: int) -> None:
    """Give ``root`` and what is under it to ``uid``/``gid`` (-1: unchanged), skipping
    what already belongs to them."""
    for directory, _, files in os.walk(root):
        for path in [directory, *(os.path.join(directory, name) for name in files)]:
            try:
                st = os.lstat(path)
                if (uid != -1 and st.st_uid != uid) or (gid != -1 and st.st_gid != gid):
                    os.lchown(path, uid, gid)
            except OSError as exc:
                log.warning("cannot give %s to the workers' account: %s", path, exc)
