"""More user errors of the launch scripts (train/eval/predict --ds-config, export, build_data,
compare): one ``error:`` line (or argparse's usage error naming the flag), exit status 2, no
traceback, and before any process group, model or child run where the error allows."""

import json
import re

import pytest

from clsgen_dist.cli import eval_main, predict_main, train_main
from tests.conftest import write_jsonl
from tests.integration._run import main_error

TINY = "launch/configs/tiny_cpu.yaml"




def _train(capsys, tmp_path, rows, *extra):
    return main_error(capsys, train_main, "--config", TINY, f"data.train_file={rows}",
                       f"output_dir={tmp_path / 'out'}", *extra)


@pytest.fixture
def rows(tmp_path):
    return write_jsonl(tmp_path / "d.jsonl", [{"text": "ok", "label": 1}, {"text": "bad", "label": 0}])


# ----------------------------------------------------------------------------- ds_config structure


@pytest.mark.parametrize("ds, needle", [
    ({"zero_optimization": "yes"}, 'zero_optimization must be an object like {"stage": 2}, got "yes"'),
    ({"bf16": True}, 'bf16 must be an object like {"enabled": "auto"}, got true'),
    ({"fp16": False}, 'fp16 must be an object like {"enabled": "auto"}, got false'),
    ({"zero_optimization": {"stage": 3, "offload_optimizer": "cpu"}},
     'zero_optimization.offload_optimizer must be an object like {"device": "cpu"}, got "cpu"'),
    ({"zero_optimization": {"stage": 3, "offload_param": True}},
     'zero_optimization.offload_param must be an object like {"device": "cpu"}, got true'),
    ({"optimizer": "AdamW"}, 'optimizer must be an object like {"type": "AdamW", "params": {}}, got "AdamW"'),
    ({"optimizer": {"type": "AdamW", "params": [1]}}, 'optimizer.params must be an object like {"lr": "auto"}'),
    ({"zero_optimization": {"stage": 7}}, "zero_optimization.stage must be 0, 1, 2 or 3, got 7"),
    ({"zero_optimization": {"stage": "2"}}, 'zero_optimization.stage must be 0, 1, 2 or 3, got "2"'),
    ({"zero_optimization": {"stage": True}}, "zero_optimization.stage must be 0, 1, 2 or 3, got true"),
])
def test_ds_config_sections_must_be_objects(tmp_path, ds, needle):
    from clsgen_dist.config import ConfigError
    from clsgen_dist.distributed.engine import load_ds_config

    f = tmp_path / "x.json"
    f.write_text(json.dumps(ds))
    with pytest.raises(ConfigError) as e:
        load_ds_config(f)
    assert str(e.value).startswith(f"ds_config {f}: ") and needle in str(e.value), e.value


def test_ds_config_and_templates_not_utf8(capsys, tmp_path, rows):
    from clsgen_dist.config import ConfigError
    from clsgen_dist.distributed.engine import load_ds_config

    f = tmp_path / "latin.json"
    f.write_bytes('{"zero_optimization": {"stage": 2}, "comment": "caf\u00e9"}'.encode("latin-1"))
    with pytest.raises(ConfigError) as e:
        load_ds_config(f)
    assert str(e.value) == f"ds_config: {f}: not valid UTF-8 (byte 51); save the file as UTF-8"
    t = tmp_path / "latin.yaml"
    t.write_bytes("system: caf\u00e9\n".encode("latin-1"))
    assert f"{t}: not valid UTF-8 (byte 11); save the file as UTF-8" in _build(capsys, tmp_path, rows, "--templates",
                                                                                str(t))


def test_shipped_ds_configs_pass(tmp_path):
    from clsgen_dist.distributed.engine import load_ds_config

    for name in ("zero2", "zero3", "zero3_offload"):
        load_ds_config(f"ds_configs/{name}.json")
    f = tmp_path / "nulls.json"  # DeepSpeed takes null for "no offload"
    f.write_text('{"zero_optimization": {"stage": 2, "offload_optimizer": null, "offload_param": null}}')
    load_ds_config(f)


def test_train_eval_predict_refuse_a_malformed_ds_config(capsys, tmp_path, rows):
    """The same one line from each script that reads a DeepSpeed JSON, before any output or model."""
    x = tmp_path / "x.json"
    x.write_text('{"bf16": true}')
    needle = f'ds_config {x}: bf16 must be an object like {{"enabled": "auto"}}, got true'
    err = _train(capsys, tmp_path, rows, f"ds_config={x}")
    assert needle in err, err
    assert not (tmp_path / "out").exists()
    x.write_text('{"zero_optimization": {"stage": 3, "offload_optimizer": "cpu"}}')
    err = main_error(capsys, eval_main, "--mode", "zero_shot", "--config", TINY, "--data", str(rows),
                      "--output", str(tmp_path / "o"), "--ds-config", str(x))
    assert f'ds_config {x}: zero_optimization.offload_optimizer must be an object like {{"device": "cpu"}}' in err
    assert not (tmp_path / "o" / "metrics.json").exists()
    x.write_text('{"zero_optimization": "yes"}')
    err = main_error(capsys, predict_main, "--checkpoint", str(tmp_path / "never-read"), "--text", "ok",
                      "--ds-config", str(x))
    assert f'ds_config {x}: zero_optimization must be an object like {{"stage": 2}}, got "yes"' in err, err
    x.write_text('{"zero_optimization": {"stage": 7}}')
    err = _train(capsys, tmp_path, rows, f"ds_config={x}")
    assert f"ds_config {x}: zero_optimization.stage must be 0, 1, 2 or 3, got 7" in err, err


# ----------------------------------------------------------------------------- export, eval


def test_export_checks_its_output_path_before_the_checkpoint(capsys, tmp_path):
    from clsgen_dist.export import main as export_main

    a_file = tmp_path / "a_file"
    a_file.write_text("x\n")
    err = main_error(capsys, export_main, "--checkpoint", str(tmp_path / "never-read"),
                      "--output", str(a_file / "merged"))
    assert f"--output {a_file / 'merged'}: {a_file} is a file, so {a_file / 'merged'} cannot be created" in err, err


def test_eval_refuses_a_config_next_to_a_checkpoint(capsys, tmp_path):
    (tmp_path / "my.yaml").write_text("train:\n  max_steps: 3\n")
    err = main_error(capsys, eval_main, "--checkpoint", str(tmp_path / "never-read"), "--config",
                      str(tmp_path / "my.yaml"), "--output", str(tmp_path / "o"))
    assert ("--config applies to --mode zero_shot without --checkpoint; a checkpoint evaluates with its own "
            "config") in err, err
    assert not (tmp_path / "o").exists()


# ----------------------------------------------------------------------------- build_data


def _build(capsys, tmp_path, rows, *extra):
    """launch/build_data.py with an endpoint teacher nobody serves: every error here comes first."""
    from clsgen_dist.construct_cli import build_data_main

    return main_error(capsys, build_data_main, "--input", str(rows), "--output", str(tmp_path / "out.jsonl"),
                       "--teacher-url", "http://127.0.0.1:9/v1", "--teacher-model", "m", *extra)


def test_build_data_cache_must_be_a_usable_folder(capsys, tmp_path, rows):
    a_file = tmp_path / "a_file"
    a_file.write_text("x\n")
    assert f"--cache {a_file}: is a file; expected a folder" in _build(capsys, tmp_path, rows, "--cache", str(a_file))
    err = _build(capsys, tmp_path, rows, "--cache", str(a_file / "cache"))
    assert f"--cache {a_file / 'cache'}: {a_file} is a file, so {a_file / 'cache'} cannot be created" in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file", "d.jsonl"]


def test_build_data_templates_not_yaml(capsys, tmp_path, rows):
    bad = tmp_path / "bad.yaml"
    bad.write_text("judge: [unclosed\nsystem: x\n")
    err = _build(capsys, tmp_path, rows, "--templates", str(bad))
    assert f"{bad}: not valid YAML (line " in err, err
    assert len([x for x in err.splitlines() if x.strip()]) == 1, err


@pytest.mark.parametrize("flag, value, needle", [
    ("--stance-threshold", "1.5", "expected a number in [0, 1), got '1.5'"),
    ("--stance-threshold", "-0.1", "expected a number in [0, 1), got '-0.1'"),
    ("--timeout", "0", "expected a number > 0, got '0'"),
    ("--backoff", "-1", "expected a number >= 0, got '-1'"),
    ("--temperature", "-0.5", "expected a number >= 0, got '-0.5'"),
    ("--top-p", "0", "expected a number in (0, 1], got '0'"),
    ("--top-p", "1.5", "expected a number in (0, 1], got '1.5'"),
    ("--top-p", "nan", "expected a number in (0, 1], got 'nan'"),
])
def test_build_data_flags_out_of_range_name_the_flag(capsys, tmp_path, rows, flag, value, needle):
    assert f"argument {flag}: {needle}" in _build(capsys, tmp_path, rows, flag, value)


def test_int_and_number_argument_types():
    """cli.int_at_least and cli.number: the value, or argparse's usage error saying what was expected."""
    import argparse

    from clsgen_dist.cli import int_at_least, number

    assert int_at_least(-1)("-1") == -1 and number(lambda x: x > 0, "> 0")("2.5") == 2.5
    for parse, text, needle in [(int_at_least(1), "0", "expected an integer >= 1, got '0'"),
                                (int_at_least(1), "1.5", "expected an integer >= 1, got '1.5'"),
                                (number(lambda x: x > 0, "> 0"), "x", "expected a number > 0, got 'x'"),
                                (number(lambda x: x > 0, "> 0"), "nan", "expected a number > 0, got 'nan'")]:
        with pytest.raises(argparse.ArgumentTypeError, match=f"^{re.escape(needle)}$"):
            parse(text)


def test_http_teacher_names_the_argument_out_of_range():
    from clsgen_dist.config import ConfigError
    from clsgen_dist.data.teachers import HTTPTeacher

    for kw, needle in [({"timeout": 0}, "--timeout must be > 0, got 0"),
                       ({"concurrency": 0}, "--concurrency must be >= 1, got 0"),
                       ({"backoff": -1.0}, "--backoff must be >= 0, got -1.0")]:
        with pytest.raises(ConfigError, match=f"^{needle}$"):
            HTTPTeacher("http://127.0.0.1:9/v1", "m", **kw)


# ----------------------------------------------------------------------------- compare


def _compare(capsys, tmp_path, rows, *extra):
    from clsgen_dist.compare import main as compare_main

    return main_error(capsys, compare_main, "--config", TINY, f"data.train_file={rows}", f"data.test_file={rows}",
                       *extra)


def test_compare_checks_flags_launcher_and_output_up_front(capsys, tmp_path, rows):
    out = ["--output", str(tmp_path / "cmp"), "--dry-run"]
    for flag, value, needle in [("--explain-limit", "-5", "expected an integer >= -1, got '-5'"),
                                ("--ppl-tokens", "-1", "expected an integer >= 0, got '-1'"),
                                ("--bootstrap", "-1", "expected an integer >= 0, got '-1'")]:
        assert f"argument {flag}: {needle}" in _compare(capsys, tmp_path, rows, *out, flag, value)
    err = _compare(capsys, tmp_path, rows, *out, "--launcher", "nosuch-launcher --nproc_per_node 2")
    assert "--launcher 'nosuch-launcher --nproc_per_node 2': nosuch-launcher is not found on the PATH" in err, err
    a_file = tmp_path / "a_file"
    a_file.write_text("x\n")
    err = _compare(capsys, tmp_path, rows, "--output", str(a_file), "--dry-run")
    assert f"--output {a_file}: is a file; expected a folder" in err, err
    assert not (tmp_path / "cmp").exists()


def test_compare_reports_a_steps_user_error_in_one_line(capsys, tmp_path, rows):
    """A mode's training fails on the user's data (a real child process, which stops before any
    model): compare says which step, the child's own error line and where its log is."""
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"text": "ok", "label": 1}, {"text": "bad", "label": 5}])
    err = _compare(capsys, tmp_path, bad, "--output", str(tmp_path / "cmp"), "--modes", "cls_only")
    log = tmp_path / "cmp" / "cls_only" / "train.log"
    line = [x for x in err.splitlines() if x.startswith("error: ")]
    assert len(line) == 1, err
    assert line[0].startswith(f"error: compare: cls_only training failed (exit 2): {bad}: line 2: field 'label' = 5"), err
    assert line[0].endswith(f"; log: {log}"), err
    assert not (tmp_path / "cmp" / "cls_only" / "eval.log").exists()
