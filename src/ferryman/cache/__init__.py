"""HTTP caching (issue 8, in progress): :mod:`ferryman.cache.policy` holds RFC 9111's
rules as pure functions; storage and the cache phases of the pipeline come next."""
