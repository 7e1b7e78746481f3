"""Reading records: bad input is a clear error naming file and line, or a counted skip; splits are stable."""

import json
from collections import Counter

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import arxiv_spec
from lmtune.core.errors import DataError
from lmtune.data.records import (
    RecordSpec,
    SkipCounts,
    SplitPlan,
    choose_labels,
    read_date,
    read_records,
    split_indices,
    split_of,
)

ARXIV = arxiv_spec()


def record(i, label="cs.CL", **overrides):
    r = {
        "id": f"2401.{i:05d}",
        "title": f"Paper {i}",
        "abstract": f"Abstract  of\npaper {i}.",
        "categories": [label, "cs.LG"],
        "primary_category": label,
    }
    r.update(overrides)
    return r


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_reads_jsonl_and_collapses_whitespace(tmp_path):
    skips = SkipCounts()
    records = read_records(write_jsonl(tmp_path / "a.jsonl", [record(1), record(2, "cs.CV")]), skips, ARXIV)
    assert [(r.id, r.label) for r in records] == [("2401.00001", "cs.CL"), ("2401.00002", "cs.CV")]
    assert records[0].fields["abstract"] == "Abstract of paper 1."
    assert skips.total == 0


def test_missing_file_names_path_and_fix(tmp_path):
    with pytest.raises(DataError, match=r"not found: .*nope\.jsonl.*data\.path="):
        read_records(tmp_path / "nope.jsonl", SkipCounts(), ARXIV)


def test_malformed_json_line_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(record(1)) + "\n" + json.dumps(record(2)) + "\n" + '{"id": "3", "title": \n')
    with pytest.raises(DataError, match=r"bad\.jsonl:3: malformed JSON"):
        read_records(path, SkipCounts(), ARXIV)


def test_non_utf8_bytes_name_the_line(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(
        json.dumps(record(1)).encode()
        + b"\n"
        + json.dumps(record(2, title="Caf\u00e9")).encode("latin-1").replace(b"\\u00e9", b"\xe9")
        + b"\n"
    )
    with pytest.raises(DataError, match=r"latin1\.jsonl:2: bytes that are not UTF-8.*iconv"):
        read_records(path, SkipCounts(), ARXIV)


def test_empty_and_missing_fields_are_counted_skips(tmp_path):
    rows = [record(1), record(2, abstract="   "), record(3, title=None), {"id": "x", "title": "t", "abstract": "a"}]
    skips = SkipCounts()
    records = read_records(write_jsonl(tmp_path / "a.jsonl", rows), skips, ARXIV)
    assert [r.id for r in records] == ["2401.00001"]
    assert skips.counts == {
        "missing or empty 'abstract'": 1,
        "missing or empty 'title'": 1,
        "missing 'primary_category' and 'categories'": 1,
    }
    assert "skipped 3 records" in skips.summary()


def test_duplicate_ids_are_counted(tmp_path):
    skips = SkipCounts()
    records = read_records(write_jsonl(tmp_path / "a.jsonl", [record(1), record(1, "cs.CV")]), skips, ARXIV)
    assert len(records) == 1 and records[0].label == "cs.CL"
    assert skips.counts == {"duplicate id": 1}


def test_primary_category_falls_back_to_first_category(tmp_path):
    row = record(1)
    del row["primary_category"]
    row["categories"] = ["cs.RO", "cs.AI"]
    assert read_records(write_jsonl(tmp_path / "a.jsonl", [row]), SkipCounts(), ARXIV)[0].label == "cs.RO"


def test_csv_with_string_categories(tmp_path):
    path = tmp_path / "a.csv"
    path.write_text('id,title,abstract,categories\n2401.1,T,"A, with comma",cs.CV cs.LG\n2401.2,T2,A2,"[\'cs.CL\']"\n')
    records = read_records(path, SkipCounts(), ARXIV)
    assert [(r.id, r.label, r.fields["abstract"]) for r in records] == [
        ("2401.1", "cs.CV", "A, with comma"),
        ("2401.2", "cs.CL", "A2"),
    ]


def test_csv_missing_column_is_an_error_naming_it(tmp_path):
    path = tmp_path / "a.csv"
    path.write_text("id,title,primary_category\n1,T,cs.CL\n")
    with pytest.raises(DataError, match=r"a\.csv: the prompt \(data\.prompt\.user\) reads column\(s\) 'abstract'"):
        read_records(path, SkipCounts(), ARXIV)


def test_parquet(tmp_path):
    path = tmp_path / "a.parquet"
    pq.write_table(pa.Table.from_pylist([record(1), record(2, "cs.CV")]), path)
    assert [r.label for r in read_records(path, SkipCounts(), ARXIV)] == ["cs.CL", "cs.CV"]


def test_unknown_file_type(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("x")
    with pytest.raises(DataError, match=r"unknown file type '\.txt'"):
        read_records(path, SkipCounts(), ARXIV)


def test_top_k_labels_and_unknown_labels_are_dropped_and_counted(tmp_path):
    rows = [record(i, "cs.CL") for i in range(5)] + [record(10 + i, "cs.CV") for i in range(3)] + [record(20, "cs.RO")]
    skips = SkipCounts()
    records = read_records(write_jsonl(tmp_path / "a.jsonl", rows), skips, ARXIV)
    labels = choose_labels(Counter(r.label for r in records), top_k=2, labels=None)
    assert labels == ["cs.CL", "cs.CV"]
    splits = split_indices([r.id for r in records], [r.label for r in records], labels, SplitPlan(0.2, 0.2), skips)
    assert sorted(i for s in splits.values() for i in s) == [i for i, r in enumerate(records) if r.label != "cs.RO"]
    assert skips.counts == {"label outside the label set": 1}
    # an explicit label set wins over top_k
    assert choose_labels(Counter(), top_k=1, labels=["cs.RO", "cs.CL", "cs.RO"]) == ["cs.CL", "cs.RO"]


def test_splits_are_stable_when_the_file_grows():
    ids = [f"2401.{i:05d}" for i in range(2000)]
    before = {i: split_of(i, 0.1, 0.1) for i in ids}
    counts = {s: sum(v == s for v in before.values()) for s in ("train", "val", "test")}
    assert 150 < counts["val"] < 250 and 150 < counts["test"] < 250
    # the split of an id depends on nothing but the id (and the fractions and salt)
    assert all(split_of(i, 0.1, 0.1) == before[i] for i in reversed(ids))
    assert sum(split_of(i, 0.1, 0.1, salt="other") != before[i] for i in ids) > 200


def test_gzipped_jsonl_and_csv_are_read_as_streams(tmp_path):
    import gzip

    rows = [record(1), record(2, "cs.CV")]
    plain = read_records(write_jsonl(tmp_path / "a.jsonl", rows), SkipCounts(), ARXIV)
    packed = tmp_path / "papers.jsonl.gz"
    packed.write_bytes(gzip.compress((tmp_path / "a.jsonl").read_bytes()))
    assert read_records(packed, SkipCounts(), ARXIV) == plain
    csv_packed = tmp_path / "papers.CSV.gz"
    csv_packed.write_bytes(gzip.compress(b'id,title,abstract,primary_category\n1,Title 1,"A, b",cs.CL\n'))
    assert [(r.id, r.fields["abstract"]) for r in read_records(csv_packed, SkipCounts(), ARXIV)] == [("1", "A, b")]


@pytest.mark.parametrize("suffix", [".jsonl.gz", ".csv.gz"])
def test_a_truncated_archive_is_an_error_naming_the_file(tmp_path, suffix):
    import gzip

    if suffix == ".csv.gz":
        text = "id,title,abstract,primary_category\n" + "".join(f"{i},T{i},Abstract {i}.,cs.CL\n" for i in range(3000))
    else:
        text = "".join(json.dumps(record(i)) + "\n" for i in range(3000))
    whole = gzip.compress(text.encode())
    path = tmp_path / f"papers{suffix}"
    path.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(DataError, match=rf"papers{suffix.replace('.', r'.')}: after line \d+: .*truncated.*gzip -t"):
        read_records(path, SkipCounts(), ARXIV)


def test_compressed_parquet_and_unknown_types_name_the_readable_ones(tmp_path):
    path = tmp_path / "a.parquet.gz"
    path.write_bytes(b"x")
    with pytest.raises(DataError, match=r"unknown file type '\.parquet\.gz'.*'\.jsonl\.gz'"):
        read_records(path, SkipCounts(), ARXIV)


def test_byte_order_mark_and_crlf_line_ends_are_accepted(tmp_path):
    rows = [record(1), record(2, "cs.CV")]
    expected = read_records(write_jsonl(tmp_path / "a.jsonl", rows), SkipCounts(), ARXIV)
    windows = tmp_path / "windows.jsonl"
    windows.write_bytes(b"\xef\xbb\xbf" + b"".join(json.dumps(r).encode() + b"\r\n" for r in rows))
    assert read_records(windows, SkipCounts(), ARXIV) == expected
    windows_csv = tmp_path / "windows.csv"
    windows_csv.write_bytes(b'\xef\xbb\xbfid,title,abstract,primary_category\r\n1,Title,"Line one,\r\ntwo",cs.CL\r\n')
    (only,) = read_records(windows_csv, SkipCounts(), ARXIV)
    assert (only.id, only.fields["abstract"], only.label) == ("1", "Line one, two", "cs.CL")


TICKETS = RecordSpec.of(("subject", "body"), "queue")


def test_any_columns_make_a_record_and_a_file_without_ids_gets_stable_text_hashes(tmp_path):
    rows = [
        {"subject": "Refund", "body": "Charged  twice.", "queue": "billing"},
        {"subject": "Login", "body": "Cannot sign in.", "queue": "access"},
        {"subject": "Refund", "body": "Charged  twice.", "queue": "billing"},  # the same text again
    ]
    skips = SkipCounts()
    records = read_records(write_jsonl(tmp_path / "t.jsonl", rows), skips, TICKETS)
    assert [(r.fields, r.label) for r in records] == [
        ({"subject": "Refund", "body": "Charged twice."}, "billing"),
        ({"subject": "Login", "body": "Cannot sign in."}, "access"),
    ]
    assert skips.counts == {"duplicate text (no id column)": 1}
    # the id depends on the row's text only: the same rows in a longer file, in another order, keep their ids
    grown = read_records(
        write_jsonl(tmp_path / "g.jsonl", [{"subject": "New", "body": "B", "queue": "x"}, *rows[::-1]]),
        SkipCounts(),
        TICKETS,
    )
    assert {r.id for r in records} <= {r.id for r in grown} and len(records[0].id) == 16


def test_a_prompt_column_the_file_lacks_names_the_column_the_file_and_its_columns(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [{"subject": "Refund", "text": "Charged twice.", "queue": "billing"}])
    with pytest.raises(DataError) as e:
        read_records(path, SkipCounts(), TICKETS)
    message = str(e.value)
    assert "t.jsonl" in message and "'body'" in message and "['queue', 'subject', 'text']" in message
    assert "\n" not in message


def test_a_missing_label_column_names_the_setting(tmp_path):
    path = tmp_path / "t.csv"
    path.write_text("subject,body,stars\nRefund,Charged twice.,5 stars\n")
    with pytest.raises(DataError, match=r"no label column 'queue'.*data\.label_column"):
        read_records(path, SkipCounts(), TICKETS)


def test_an_empty_id_cell_is_a_counted_skip_and_renamed_columns_are_read(tmp_path):
    spec = RecordSpec.of(("text",), "stars", id="review_id", rename={"text": "review"})
    rows = [
        {"review_id": "r1", "review": "Great.", "stars": "5 stars"},
        {"review_id": "", "review": "Bad.", "stars": "1 star"},
    ]
    skips = SkipCounts()
    (only,) = read_records(write_jsonl(tmp_path / "r.jsonl", rows), skips, spec)
    assert (only.id, only.fields, only.label) == ("r1", {"text": "Great."}, "5 stars")
    assert skips.counts == {"missing or empty 'review_id'": 1}


def test_dates_are_read_as_utc_iso_and_anything_else_is_no_date():
    assert read_date("2026-07-01") == "2026-07-01T00:00:00"
    assert read_date("2026-07-01T23:30:00Z") == "2026-07-01T23:30:00"
    assert read_date("2026-07-02T01:30:00+02:00") == "2026-07-01T23:30:00"  # the same moment, in UTC
    assert read_date(" 2026-07-01 ") == "2026-07-01T00:00:00"
    for bad in (None, "", "yesterday", "2026-13-01", "07/01/2026", 20260701, float("nan")):
        assert read_date(bad) == "", bad


def dated_rows(n: int, undated: int = 0) -> list[dict]:
    """n papers, one a day from 2026-01-01, written in a shuffled order; the first `undated` with no date."""
    rows = [
        record(i, ("cs.CL", "cs.CV")[i % 2], published=f"2026-{1 + i // 28:02d}-{1 + i % 28:02d}") for i in range(n)
    ]
    for r in rows[:undated]:
        r["published"] = None
    return [rows[(7 * k) % n] for k in range(n)]  # 7 and n coprime: every row once, out of date order


def test_a_split_by_time_trains_on_the_oldest_rows_and_tests_on_the_newest(tmp_path):
    spec = RecordSpec.of(("title", "abstract"), "primary_category", date="published", all_labels="categories")
    skips = SkipCounts()
    records = read_records(write_jsonl(tmp_path / "a.jsonl", dated_rows(100)), skips, spec)
    plan = SplitPlan(0.1, 0.2, kind="time", date_column="published")
    splits = split_indices([r.id for r in records], None, None, plan, skips, [r.date for r in records])
    dates = {name: sorted(records[i].date for i in positions) for name, positions in splits.items()}
    assert [len(dates[name]) for name in ("train", "val", "test")] == [70, 10, 20]
    assert dates["train"][-1] < dates["val"][0] and dates["val"][-1] < dates["test"][0]
    assert dates["test"][-1] == max(r.date for r in records)
    assert records[0].labels == (records[0].label, "cs.LG")  # the label first, then the row's other labels


def test_a_split_by_time_refuses_rows_without_a_date_in_one_line_or_skips_them_counted(tmp_path):
    spec = RecordSpec.of(("title", "abstract"), "primary_category", date="published")
    records = read_records(write_jsonl(tmp_path / "a.jsonl", dated_rows(50, undated=3)), SkipCounts(), spec)
    ids, dates = [r.id for r in records], [r.date for r in records]
    plan = SplitPlan(0.1, 0.1, kind="time", date_column="published")
    with pytest.raises(
        DataError, match=r"a.jsonl: 3 of 50 rows have no readable date in 'published'.*missing_dates=skip"
    ):
        split_indices(ids, None, None, plan, SkipCounts(), dates, str(tmp_path / "a.jsonl"))
    skips = SkipCounts()
    splits = split_indices(ids, None, None, SplitPlan(0.1, 0.1, "", "time", "published", "skip"), skips, dates)
    assert sum(map(len, splits.values())) == 47
    assert skips.counts == {"no readable date in 'published' (data.split=time)": 3}
    assert SplitPlan(kind="time").problems() == [
        "data.split=time needs data.date_column: the column of dates to order the rows by"
    ]
    assert "data.split='weekly'" in SplitPlan(kind="weekly").problems()[0]
