"""hil.bench's verdict on what the subscriber saw (the bench itself runs in .ci/run, short profile)."""

from __future__ import annotations

from typing import Any

from hil.bench import sequence_check


class Seen:
    def __init__(self, seqs: list[int]) -> None:
        self.msgs = [{"seq": s, "readings": []} for s in seqs]

    def data(self) -> list[dict[str, Any]]:
        return self.msgs


def test_sequence_check_passes_repeats_and_fails_gaps() -> None:
    ok = sequence_check(Seen([5, 6, 6, 7, 8]), set())  # type: ignore[arg-type]
    assert ok["pass"] and ok["repeated"] == 1 and (ok["first"], ok["last"]) == (5, 8)
    gap = sequence_check(Seen([5, 6, 9, 10]), set())  # type: ignore[arg-type]
    assert not gap["pass"] and gap["gaps"] == [(6, 9)]
    assert not sequence_check(Seen([]), set())["pass"]  # type: ignore[arg-type]  # nothing arrived: a failure


def test_a_gap_where_a_restart_resumed_above_its_lease_is_no_loss() -> None:
    resumed = sequence_check(Seen([5, 6, 70_000, 70_001]), {70_000})  # type: ignore[arg-type]
    assert resumed["pass"] and resumed["resumed"] == 1
    other = sequence_check(Seen([5, 6, 70_000, 70_002]), {70_000})  # type: ignore[arg-type]
    assert not other["pass"] and other["gaps"] == [(70_000, 70_002)]
