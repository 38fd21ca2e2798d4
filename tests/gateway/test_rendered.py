"""Rendered legacy JSON: reused for the same reply bytes, bounded, and byte-exact."""

from __future__ import annotations

import json

from server.gateway import legacy
from server.gateway.app import dumps
from server.gateway.rendered import RenderedCache
from server.gateway.requests import Request


def test_the_envelope_around_rendered_data_is_byte_exact() -> None:
    request = Request.unread()
    data = {"id": "n", "value": 9007199254740993, "ratio": 0.5, "名": "值", "none": None}
    assert legacy.success_body(dumps(data), request) == dumps(legacy.success(data, request))
    assert json.loads(legacy.success_body(dumps(data), request))["data"] == data


def test_entries_are_keyed_by_reply_and_variant() -> None:
    cache = RenderedCache(max_bytes=1000)
    cache.put(b"reply", True, (b"named", "tag"))
    cache.put(b"reply", False, (b"unnamed", "tag"))
    assert cache.get(b"reply", True) == (b"named", "tag")
    assert cache.get(b"reply", False) == (b"unnamed", "tag")
    assert cache.get(b"other", True) is None


def test_the_cache_is_bounded_by_bytes() -> None:
    cache = RenderedCache(max_bytes=1000)
    for n in range(20):
        cache.put(b"r%03d" % n + b"x" * 60, True, (b"y" * 60, "tag"))
    assert len(cache) == 8  # 8 x 124 bytes fit in 1,000
    assert cache.get(b"r019" + b"x" * 60, True) == (b"y" * 60, "tag")
    assert cache.get(b"r000" + b"x" * 60, True) is None
    cache.put(b"huge", True, (b"z" * 200, "tag"))  # over an eighth of the budget: not kept
    assert cache.get(b"huge", True) is None
