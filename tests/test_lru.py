"""The byte-bounded LRU behind the reply cache and the bk-sops store's trees."""

from __future__ import annotations

from server.lru import SizedLRU


def test_the_least_recently_used_go_first_when_the_bytes_run_over() -> None:
    kept: SizedLRU[str, int] = SizedLRU(max_bytes=10)
    for key, value in (("a", 1), ("b", 2), ("c", 3)):
        kept.put(key, value, 4)
    assert len(kept) == 2 and kept.bytes == 8
    assert "a" not in kept and kept.get("b") == 2
    kept.put("d", 4, 4)  # b was used after c: c goes
    assert "c" not in kept and kept.get("b") == 2 and kept.get("d") == 4


def test_a_value_put_again_is_weighed_once() -> None:
    kept: SizedLRU[str, str] = SizedLRU(max_bytes=10)
    kept.put("a", "old", 6)
    kept.put("a", "new", 3)
    assert kept.bytes == 3 and kept.get("a") == "new"


def test_a_value_over_the_whole_bound_is_not_kept_and_evicts_nothing() -> None:
    kept: SizedLRU[str, str] = SizedLRU(max_bytes=10)
    kept.put("a", "small", 5)
    kept.put("b", "huge", 11)
    assert "b" not in kept and kept.get("a") == "small" and kept.bytes == 5
