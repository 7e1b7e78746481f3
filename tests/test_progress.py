"""Progress of long work: a log line every ~10% when stderr is not a terminal, with done, rate and time left."""

import logging

from lmtune.core.progress import Progress


def test_a_line_at_every_tenth_however_the_work_is_chunked(caplog):
    with caplog.at_level(logging.INFO, logger="lmtune.core.progress"):
        with Progress(300, "rank scoring", terminal=False, min_interval=0) as progress:
            for chunk in [7] * 42 + [6]:  # chunks that do not divide the tenths
                progress.advance(chunk)
    lines = [r.getMessage() for r in caplog.records]
    done = [int(line.split(": ")[1].split("/")[0]) for line in lines]
    assert len(lines) == 10 and done[-1] == 300 and done == sorted(done)
    assert all(d * 10 // 300 == n for n, d in enumerate(done, start=1))  # each line the first past its tenth
    assert lines[-1].startswith("rank scoring: 300/300 examples (100%), ") and lines[-1].endswith(", 0 s left")
    assert "examples/s" in lines[0]


def test_a_chunk_that_crosses_several_tenths_writes_one_line_and_a_terminal_writes_none(caplog):
    with caplog.at_level(logging.INFO, logger="lmtune.core.progress"):
        with Progress(10, "scoring", terminal=False, min_interval=0) as progress:
            progress.advance(6)
            progress.advance(4)
        assert [r.getMessage().split(",")[0] for r in caplog.records] == [
            "scoring: 6/10 examples (60%)",
            "scoring: 10/10 examples (100%)",
        ]
        caplog.clear()
        with Progress(10, "scoring", terminal=True) as progress:  # a rich bar instead of log lines
            progress.advance(10)
        assert not caplog.records and progress.done == 10


def test_work_of_a_few_seconds_writes_only_its_final_line(caplog):
    with caplog.at_level(logging.INFO, logger="lmtune.core.progress"):
        with Progress(17, "rank scoring", terminal=False) as progress:  # 5 s between lines by default
            for _ in range(17):
                progress.advance(1)
    assert [r.getMessage().split(",")[0] for r in caplog.records] == ["rank scoring: 17/17 examples (100%)"]
