import json

import pytest

from clsgen_dist.data.reading import DataError, read_examples
from tests.conftest import write_jsonl

NAMES = ["negative", "positive"]


def read(path, **kw):
    return read_examples(path, label_names=NAMES, **kw)


def test_jsonl_labels_as_ints_names_and_strings(tmp_path):
    p = write_jsonl(tmp_path / "d.jsonl", [
        {"id": "a", "text": "good", "label": 1},
        {"id": "b", "text": "bad", "label": "Negative"},
        {"text": "fine", "label": "1", "explanation": "  It is fine.  "},
        {"text": "meh", "label": False, "explanation": ""},
    ])
    exs = read(p)
    assert [e.label for e in exs] == [1, 0, 1, 0]
    assert [e.id for e in exs] == ["a", "b", "3", "4"]  # row numbers where there is no id
    assert [e.explanation for e in exs] == [None, None, "It is fine.", None]


@pytest.mark.parametrize("fmt", ["csv", "parquet", "saved"])
def test_other_formats(tmp_path, fmt):
    import datasets

    ds = datasets.Dataset.from_list([{"text": "good", "label": 1}, {"text": "bad", "label": 0}])
    if fmt == "csv":
        p = tmp_path / "d.csv"
        ds.to_csv(str(p))
    elif fmt == "parquet":
        p = tmp_path / "d.parquet"
        ds.to_parquet(str(p))
    else:
        p = tmp_path / "saved"
        ds.save_to_disk(str(p))
    exs = read(p)
    assert [(e.text, e.label) for e in exs] == [("good", 1), ("bad", 0)]


def test_limit(tmp_path):
    p = write_jsonl(tmp_path / "d.jsonl", [{"text": f"t{i}", "label": i % 2} for i in range(10)])
    assert len(read(p, limit=3)) == 3


@pytest.mark.parametrize("rows, needle", [
    ([{"txt": "a", "label": 1}], "missing field 'text'"),
    ([{"text": "a", "lbl": 1}], "missing field 'label'"),
    ([{"text": "a", "label": 1}, {"text": "b", "label": 2}], "line 2: field 'label' = 2 is not a label"),
    ([{"text": "a", "label": 1}, {"text": "b", "label": "maybe"}], "expected 0, 1, 'negative' or 'positive'"),
    ([{"text": "a", "label": 1}, {"text": "", "label": 0}], "line 2: field 'text' must be a non-empty string"),
    ([{"text": "a", "label": 1}, {"text": "b", "label": 0, "explanation": 5}], "line 2: field 'explanation'"),
])
def test_bad_rows_name_file_row_and_field(tmp_path, rows, needle):
    p = write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(DataError) as e:
        read(p)
    assert needle in str(e.value) and str(p) in str(e.value)


def test_malformed_jsonl_line(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text(json.dumps({"text": "a", "label": 1}) + "\n{not json\n")
    with pytest.raises(DataError, match=r"bad.jsonl: line 2: malformed JSON"):
        read(p)


def test_malformed_json_array_names_its_real_line(tmp_path, capfd):
    """A .json file holding one array is parsed as a document (not line by line, which blamed
    line 1); a non-object item is named; a file that is no parquet gets one message, without the
    datasets library's own ERROR lines before it."""
    p = tmp_path / "d.json"
    p.write_text('[{"text": "a", "label": 1},\n {"text": "b", "label": 0},\n {"text": ]\n')
    with pytest.raises(DataError, match=r"d.json: could not read as json: line 3: malformed JSON \(Expecting value"):
        read(p)
    p.write_text('[{"text": "a", "label": 1},\n 3]\n')
    with pytest.raises(DataError, match="item 2 of the array: expected a JSON object, got int"):
        read(p)
    p.write_text('[{"text": "a", "label": 1},\n {"text": "b", "label": 0},\n]\n')  # strict JSON: no trailing comma
    with pytest.raises(DataError, match=r"d.json: could not read as json: line 3: malformed JSON \(Expecting value"):
        read(p)
    p.write_text('\ufeff[{"text": "a", "label": 1},\n {"text": "b", "label": "negative", "id": 7}]\n')
    assert [(e.text, e.label) for e in read(p)] == [("a", 1), ("b", 0)]
    q = tmp_path / "d.parquet"
    q.write_text("not parquet at all")
    capfd.readouterr()
    with pytest.raises(DataError, match="d.parquet: could not read as parquet: Parquet magic bytes not found"):
        read(q)
    assert "ERROR" not in "".join(capfd.readouterr())


def test_empty_and_missing_files(tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(DataError, match="the file is empty"):
        read(tmp_path / "empty.jsonl")
    (tmp_path / "blank.jsonl").write_text("\n\n")
    with pytest.raises(DataError, match="no rows"):
        read(tmp_path / "blank.jsonl")
    with pytest.raises(DataError, match="no such file"):
        read(tmp_path / "nope.jsonl")
    (tmp_path / "x.txt").write_text("hello")
    with pytest.raises(DataError, match="unsupported file type"):
        read(tmp_path / "x.txt")


def test_bad_csv_row(tmp_path):
    p = tmp_path / "d.csv"
    p.write_text("text,label\ngood,1\nbad,7\n")
    # the file's line (the header is line 1)
    with pytest.raises(DataError, match=r"d.csv: line 3: field 'label' = '7' is not a label"):
        read(p)


def test_csv_cells_are_read_as_written(tmp_path):
    """No type guessing: ids keep their leading zeros, a note that reads N/A or null is text, an
    empty cell is missing; a boolean column's true/false are labels; BOM and CRLF are fine."""
    p = tmp_path / "notes.csv"
    p.write_bytes("\ufeffid,text,label,explanation\r\n00123,N/A,true,\r\n0456,null,False,NA\r\n"
                  ",\"chest pain, \r\nradiating\",1,Because.\r\n\r\n".encode())
    exs = read(p)
    assert [e.id for e in exs] == ["00123", "0456", "4"]  # the empty id: the line the row starts on
    assert [e.text for e in exs] == ["N/A", "null", "chest pain, \r\nradiating"]
    assert [e.label for e in exs] == [1, 0, 1]
    assert [e.explanation for e in exs] == [None, "NA", "Because."]


def test_csv_unnamed_columns_and_long_cells(tmp_path):
    """A pandas index column (``df.to_csv()``) and trailing commas are columns without a name:
    ignored. A cell far longer than the csv module's default 131,072-character cap is read."""
    import pandas as pd

    p = tmp_path / "pandas.csv"
    pd.DataFrame({"text": ["good film", "x" * 200_000], "label": [1, 0]}).to_csv(p)
    assert [(e.text[:9], len(e.text), e.label) for e in read(p)] == [("good film", 9, 1), ("x" * 9, 200_000, 0)]
    p = tmp_path / "trailing.csv"
    p.write_text("text,label,\nhi,1,\nho,0,\n")
    assert [(e.text, e.label) for e in read(p)] == [("hi", 1), ("ho", 0)]


@pytest.mark.parametrize("body, message", [
    ("text,label\nok,1\npain, severe,1\n", r"line 3: 3 fields, expected 2 as in the header \(text, label\); quote"),
    ("text,label\nok,1\n\"a\nb\",0\nshort\n", r"line 5: 1 fields, expected 2"),  # after a 2-line quoted field
    ("text,label\r\n", r"the header \(text, label\) is followed by no data rows"),
    ("\ufeff\n\n", r"no header row"),
    ("text,label,explanation\ngood,1,\"Because it is fun\nbad,0,Boring.\n", r"line 2: a quoted field that starts "
     r"here is never closed"),  # not one row whose explanation swallows the rest of the file
    ("text,label,text\nok,1,x\n", r"line 1: .*column name 'text' appears twice"),
])
def test_malformed_csv_names_the_line(tmp_path, body, message):
    p = tmp_path / "bad.csv"
    p.write_text(body)
    with pytest.raises(DataError, match=rf"bad.csv: {message}"):
        read(p)


def test_byte_order_mark_and_non_utf8_bytes(tmp_path):
    p = tmp_path / "bom.jsonl"
    p.write_bytes(b"\xef\xbb\xbf" + json.dumps({"text": "good", "label": "1.0"}).encode() + b"\n")
    assert [(e.text, e.label) for e in read(p)] == [("good", 1)]  # BOM ignored; "1.0" is a label too
    for name, body, line in [("latin1.jsonl", b'{"text": "ok", "label": 1}\n{"text": "caf\xe9", "label": 0}\n', 2),
                             ("latin1.csv", b"text,label\nok,1\ncaf\xe9,0\n", 3)]:  # physical lines
        (tmp_path / name).write_bytes(body)
        with pytest.raises(DataError, match=rf"{name}: line {line}: not valid UTF-8 \(byte 0xe9 at column "):
            read(tmp_path / name)


def test_repeated_ids_are_a_warning(tmp_path, caplog):
    p = tmp_path / "d.csv"
    p.write_text("id,text,label\na,one,1\nb,two,0\na,three,1\n,four,0\n2,five,1\n")
    with caplog.at_level("WARNING", logger="clsgen_dist.data"):
        exs = read(p)
    assert [e.id for e in exs] == ["a", "b", "a", "5", "2"]
    assert "d.csv: ids repeated: 1 (e.g. 'a' at lines 2, 4)" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="clsgen_dist.data"):
        read(p, limit=2)
    assert caplog.text == ""


def test_jsonl_and_csv_need_no_datasets_package(tmp_path):
    """JSONL and CSV are parsed here: reading them, and importing the training and evaluation
    entry points, works where ``datasets`` is not installed (the CUDA image the GPU checks run on
    lacks it); only the formats it reads import it."""
    import subprocess
    import sys

    jl = write_jsonl(tmp_path / "d.jsonl", [{"text": "good", "label": 1}, {"text": "bad", "label": 0}])
    (tmp_path / "d.csv").write_text("text,label\ngood,1\nbad,0\n")
    script = f"""
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name == "datasets" or name.startswith("datasets."):
            raise ModuleNotFoundError("No module named 'datasets'", name="datasets")
sys.meta_path.insert(0, Block())
import clsgen_dist.train, clsgen_dist.evaluate_cli, clsgen_dist.predict, clsgen_dist.export
from clsgen_dist.data.reading import read_examples
for f in ({str(jl)!r}, {str(tmp_path / 'd.csv')!r}):
    assert [e.label for e in read_examples(f, label_names=["negative", "positive"])] == [1, 0]
try:
    read_examples({str(tmp_path / 'd.parquet')!r}, label_names=["negative", "positive"])
except ModuleNotFoundError:
    print("parquet needs datasets")
"""
    (tmp_path / "d.parquet").write_bytes(b"PAR1")
    p = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "parquet needs datasets" in p.stdout  # the blocker works: the test would see an eager import
