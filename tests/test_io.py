"""lowbit.io: an atomic write leaves the old file or the new one, never half of one, and no temporary."""

import pytest

from lowbit.io import atomic_path, atomic_write_text, leftover_temporaries, temporary_name


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "log.json"
    atomic_write_text(target, "old")
    with pytest.raises(OSError, match="disk full"):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise OSError("disk full")
    assert target.read_text() == "old"
    assert leftover_temporaries(tmp_path) == []


def test_a_write_replaces_and_leftovers_are_found(tmp_path):
    target = tmp_path / "checkpoint.pt"
    atomic_write_text(target, "new")
    assert target.read_text() == "new" and leftover_temporaries(tmp_path) == []
    stale = temporary_name(target).with_name(".checkpoint.pt.tmp99999")  # as a killed process leaves it
    stale.write_text("partial")
    assert leftover_temporaries(tmp_path) == [stale]
    assert leftover_temporaries(tmp_path / "missing") == []
