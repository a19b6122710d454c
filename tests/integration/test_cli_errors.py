"""User errors: one clear line, exit status 2, no traceback, no output that looks complete."""

import pytest

from clsgen_dist.cli import train_main
from tests.conftest import write_jsonl
from tests.integration._run import launch


def _train(capsys, *args):
    with pytest.raises(SystemExit) as e:
        train_main(list(args))
    err = capsys.readouterr().err
    assert e.value.code == 2 and "Traceback" not in err
    return err


def test_unknown_config_key_lists_valid_ones(capsys):
    err = _train(capsys, "train.max_step=3")
    assert "unknown config key 'train.max_step'" in err and "did you mean train.max_steps" in err
    assert "gradient_accumulation_steps" in err


def test_bad_values(capsys):
    assert "train.max_steps must be a positive integer" in _train(capsys, "train.max_steps=0")
    assert "model.finetune: expected one of" in _train(capsys, "model.finetune=qlora")
    assert "config file not found" in _train(capsys, "--config", "/nonexistent.yaml")


@pytest.mark.parametrize("rows, needle", [
    ([{"text": "a", "label": 1}, {"text": "b", "label": 5}], "line 2: field 'label' = 5 is not a label"),
    ([{"body": "a", "label": 1}], "missing field 'text'"),
])
def test_bad_data_in_process(capsys, tmp_path, rows, needle):
    f = write_jsonl(tmp_path / "train.jsonl", rows)
    err = _train(capsys, f"data.train_file={f}", f"output_dir={tmp_path / 'out'}")
    assert needle in err and str(f) in err
    assert not (tmp_path / "out").exists()


def test_bad_data_subprocess_exit_code_and_no_traceback(tmp_path):
    f = tmp_path / "train.jsonl"
    f.write_text('{"text": "ok", "label": 1}\n{"text": "broken", "label": \n')
    proc = launch("train.py", [f"data.train_file={f}", f"output_dir={tmp_path / 'out'}"], check=False)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert f"{f}: line 2: malformed JSON" in proc.stderr
    assert not (tmp_path / "out").exists()


def test_missing_file_and_checkpoint(tmp_path):
    proc = launch("eval.py", ["--checkpoint", str(tmp_path / "nope"), "--data", "x.jsonl", "--output",
                              str(tmp_path / "o")], check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and "not a complete clsgen checkpoint" in proc.stderr
