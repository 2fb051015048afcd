import json

import numpy as np
import pandas as pd
import pytest

from tests.conftest import DATA, arena_row
from trainer_core.data.arena import DataError, assign_folds, load_dataset, load_rows, parse_folds, parse_turns


def write_csv(tmp_path, rows, name="d.csv"):
    p = tmp_path / name
    pd.DataFrame(rows).to_csv(p, index=False)
    return p


def test_bundled_data_loads_with_balanced_folds():
    rows = assign_folds(load_rows(DATA), 5)
    assert len(rows) == 2000 and rows["id"].is_unique
    assert (rows["fold"] == rows["id"] % 5).all()
    counts = rows["fold"].value_counts()
    assert counts.min() > 300 and counts.max() < 500
    assert rows["label"].value_counts().to_dict() == {0: 976, 1: 976, 2: 48}


def test_every_bundled_row_is_attributed_to_a_licensed_source():
    """data/README.md's sources table holds each source's licence and row count; the provenance file maps every id
    of the bundled data to one source row: together they are the attribution the licences (MIT, Apache-2.0) ask for."""
    prov = pd.read_csv(DATA.with_name("arena_sample_provenance.csv"))
    rows = pd.read_csv(DATA)
    assert prov["id"].is_unique and set(prov["id"]) == set(rows["id"])
    readme = " ".join(DATA.with_name("README.md").read_text().split())
    counts = prov["source"].str.split("/").str[0].value_counts().to_dict()
    assert counts == {"hh-rlhf": 1502, "pandalm": 498}
    assert "Anthropic HH-RLHF, `helpful-base/test.jsonl.gz` (arXiv 2204.05862) | 1,502 | MIT" in readme
    assert "PandaLM `data/testset-v1.json` (WeOpenML/PandaLM) | 498 | Apache-2.0" in readme


def test_parse_turns_joins_with_space_and_maps_null_to_empty():
    assert parse_turns('["Hi", null, "there"]') == "Hi  there"
    assert parse_turns("[null]") == ""
    assert parse_turns("[]") == ""
    assert parse_turns('"just a string"') is None
    assert parse_turns('[1, 2]') is None
    assert parse_turns("not json") is None
    assert parse_turns(["already", "a list"]) == "already a list"


def test_python_expressions_are_never_evaluated(tmp_path):
    marker = tmp_path / "pwned"
    cell = f"__import__('pathlib').Path({str(marker)!r}).write_text('x')"
    p = write_csv(tmp_path, [arena_row(1), {**arena_row(2), "prompt": cell}, arena_row(3)])
    with pytest.raises(DataError, match=r"column 'prompt': id 2: not a JSON list of strings"):
        load_rows(p)
    assert not marker.exists()


def test_labels_text_and_extra_columns(tmp_path):
    rows = [arena_row(10, "a", prompt=["p1", "p2"]), arena_row(11, "b", a=[None]), arena_row(12, "tie")]
    for r in rows:
        r["extra"] = "ignored"
    df = load_rows(write_csv(tmp_path, rows))
    assert df["label"].tolist() == [0, 1, 2]
    assert df["prompt"].iloc[0] == "p1 p2" and df["response_a"].iloc[1] == ""
    assert list(df.columns) == ["id", "prompt", "response_a", "response_b", "label"]


def test_parquet_input_with_list_cells(tmp_path):
    rows = [arena_row(i) for i in range(1, 6)]
    df = pd.DataFrame(rows)
    df["prompt"] = [["q", None] for _ in rows]
    p = tmp_path / "d.parquet"
    df.to_parquet(p)
    out = load_rows(p)
    assert out["prompt"].tolist() == ["q "] * 5


def test_text_utf8_cannot_encode_becomes_fffd_row_kept_and_reported_once(tmp_path, caplog):
    """A lone surrogate escape (half an emoji, as in the real Kaggle train.csv) and invalid bytes both become U+FFFD;
    a U+FFFD the file really holds is text, not reported; the result survives parquet (the original crash)."""
    rows = [arena_row(1), arena_row(2, a=["broken emoji \ud83d here"]), arena_row(3, prompt=["genuine \ufffd"]),
            arena_row(4, b=["pair \ud83d\ude00 ok"]), arena_row(5)]
    p = write_csv(tmp_path, rows)
    assert b"\\ud83d here" in p.read_bytes()  # the escape is in the file as JSON text, as json.dumps writes it
    p.write_bytes(p.read_bytes().replace(b"answer a 5", b"answer \xff\xfe 5"))
    with caplog.at_level("WARNING"):
        data = load_dataset(p)
    df = data.rows
    assert len(df) == 5 and data.repaired_ids == [2, 5]
    assert df["response_a"].iloc[1] == "broken emoji \ufffd here"
    assert df["response_a"].iloc[4] == "answer \ufffd\ufffd 5"
    assert df["prompt"].iloc[2] == "genuine \ufffd" and df["response_b"].iloc[3] == "pair \U0001f600 ok"
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "2 rows" in warnings[0] and "ids 2, 5" in warnings[0]
    df.to_parquet(tmp_path / "out.parquet")  # pyarrow raised UnicodeEncodeError here before


# (what is wrong, how the input is made, the line that must say so). How: a column name = that column removed from
# seven good rows (ids 1-7); a list = cells (row index, column, value) changed in them; a pair = a file (name, bytes)
# written as is, or not written (None: the folder itself for ".", else a missing file).
BAD_INPUT = [
    ("missing_column", "response_b", r"d.csv: missing column response_b"),
    ("bad_json", [(2, "response_a", "[unclosed"), (4, "response_a", '{"a": 1}')],
     r"column 'response_a': ids 3, 5: not a JSON list of strings"),
    ("not_strings", [(1, "prompt", "[1, 2]")], r"column 'prompt': id 2: not a JSON list of strings"),
    ("empty_cell", [(3, "response_b", "")], r"column 'response_b': id 4: not a JSON list of strings"),
    ("two_winners", [(0, "winner_model_b", 1)], r"winner_tie: id 1: exactly one must be 1"),
    ("no_winner", [(5, "winner_model_a", 0), (5, "winner_model_b", 0)], r"winner_tie: id 6: exactly one must be 1"),
    ("label_not_01", [(2, "winner_tie", 2)], r"winner_tie: id 3: values must be 0 or 1"),
    ("dup_ids", [(3, "id", 2)], r"column 'id': duplicate id 2"),
    ("non_int_id", [(2, "id", "abc")], r"column 'id': missing or non-integer values at lines 4"),
    ("missing_id", [(4, "id", "")], r"column 'id': missing or non-integer values at lines 6"),
    ("empty_file", ("d.csv", b""), r"d.csv: file is empty"),
    ("header_only", ("d.csv", ",".join(arena_row(1)).encode() + b"\n"), r"d.csv: file has a header but no rows"),
    ("directory", (".", None), r"is a directory"),
    ("not_found", ("nope.csv", None), r"nope.csv: file not found"),
    ("bad_parquet", ("d.parquet", b"this is not parquet"), r"d.parquet: cannot read as parquet"),
]


def make_bad_input(tmp_path, how):
    rows = [arena_row(i, "a" if i % 2 else "b") for i in range(1, 8)]
    if isinstance(how, str):
        return write_csv(tmp_path, [{k: v for k, v in r.items() if k != how} for r in rows])
    if isinstance(how, list):
        for i, column, value in how:
            rows[i][column] = value
        return write_csv(tmp_path, rows)
    path = tmp_path / how[0]
    if how[1] is not None:
        path.write_bytes(how[1])
    return path


@pytest.mark.parametrize("how, message", [case[1:] for case in BAD_INPUT], ids=[case[0] for case in BAD_INPUT])
def test_bad_input_gets_one_clear_line(tmp_path, how, message):
    p = make_bad_input(tmp_path, how)
    with pytest.raises(DataError, match=message) as e:
        load_rows(p)
    assert str(p.name if p.is_file() or not p.exists() else p) in str(e.value)


def test_every_problem_is_listed_at_once(tmp_path):
    rows = [arena_row(i) for i in range(1, 6)]
    rows[0]["prompt"] = "nope"
    rows[1]["winner_model_b"] = 1
    rows[2]["id"] = rows[3]["id"]
    with pytest.raises(DataError) as e:
        load_rows(write_csv(tmp_path, rows))
    assert len(str(e.value).splitlines()) == 3


def test_many_bad_ids_are_summarised(tmp_path):
    rows = [arena_row(i) for i in range(1, 21)]
    for r in rows[:12]:
        r["prompt"] = "x"
    with pytest.raises(DataError, match=r"ids 1, 2, 3, 4, 5 \(\+7 more\)"):
        load_rows(write_csv(tmp_path, rows))


@pytest.mark.parametrize("spec, folds", [("0-4", [0, 1, 2, 3, 4]), ("0,2,4", [0, 2, 4]), ("3", [3]),
                                         ("all", [0, 1, 2, 3, 4]), ("1-2,4", [1, 2, 4])])
def test_parse_folds(spec, folds):
    assert parse_folds(spec, 5) == folds


@pytest.mark.parametrize("spec", ["5", "0-5", "a", "3-1", ""])
def test_parse_folds_rejects(spec):
    with pytest.raises(ValueError, match="--folds"):
        parse_folds(spec, 5)


def test_folds_are_a_pure_function_of_ids():
    df = pd.DataFrame({"id": np.array([7, 12, 5, 100, 3]), "label": [0, 1, 2, 0, 1]})
    assert assign_folds(df, 5)["fold"].tolist() == [2, 2, 0, 0, 3]
    assert assign_folds(df.sample(frac=1, random_state=1), 5).sort_values("id")["fold"].tolist() == [3, 0, 2, 2, 0]


def test_max_rows_slices_in_file_order():
    assert load_rows(DATA, max_rows=50)["id"].tolist() == json.loads(
        pd.read_csv(DATA, usecols=["id"]).head(50)["id"].to_json(orient="values"))


def test_fold_by_row_is_row_position():
    df = pd.DataFrame({"id": np.array([7, 12, 5, 100, 3, 9]), "label": [0, 1, 2, 0, 1, 0]})
    assert assign_folds(df, 5, by="row")["fold"].tolist() == [0, 1, 2, 3, 4, 0]
    assert assign_folds(df, 5, by="id")["fold"].tolist() == [2, 2, 0, 0, 3, 4]


def test_fold_by_prompt_keeps_each_prompt_in_one_fold_and_stratifies():
    rows = load_rows(DATA)
    # the bundled file has no repeated prompts; repeat some, as arena data does (one prompt, many model pairs)
    rows["prompt"] = [f"prompt {i % 700}" for i in range(len(rows))]
    folds = assign_folds(rows, 5, by="prompt")
    assert (folds.groupby("prompt")["fold"].nunique() == 1).all()
    counts = folds["fold"].value_counts()
    assert sorted(counts.index) == [0, 1, 2, 3, 4] and counts.min() > 350 and counts.max() < 450
    share_a = folds.groupby("fold")["label"].apply(lambda s: (s == 0).mean())
    assert share_a.max() - share_a.min() < 0.05  # stratified by label
    again = assign_folds(rows.sample(frac=1, random_state=0).sort_index(), 5, by="prompt")
    assert (again["fold"] == folds["fold"]).all()  # fixed seed: the same folds every run
    by_id = assign_folds(rows, 5, by="id")
    assert (by_id.groupby("prompt")["fold"].nunique() > 1).any()  # what id % 5 does to repeated prompts


def test_fold_by_prompt_needs_enough_prompts():
    df = pd.DataFrame({"id": range(10), "prompt": ["p", "q"] * 5, "label": [0, 1] * 5})
    with pytest.raises(DataError, match="2 distinct prompts cannot fill 5 folds"):
        assign_folds(df, 5, by="prompt")
