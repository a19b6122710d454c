#!/usr/bin/env python
"""CLSGen vs cls_only / gen_only / zero_shot on the real default (SmolLM2-135M-Instruct x Rotten
Tomatoes), through launch/compare.py. Results: benchmarks/compare.md (written by hand from OUT/compare.md).

    python benchmarks/compare_rt.py --output outputs/compare_rt [compare.py options and key=value overrides]
    python benchmarks/compare_rt.py --output outputs/cmp20 --steps 20 data.test_limit=64 data.dev_limit=64

By default this script writes the default training split with a *templated* label-conditioned
rationale per example (one of three fixed sentences per label, picked by a hash of the id) before the
verdict line, and turns the teacher off (``data.teacher=null``): cheap, deterministic answers whose
format the LM term can learn. They carry no information beyond the label, so readability and
alignment figures measure the format and the head/verdict agreement, not rationale quality. Without
any explanations CLSGen's LM term is empty (CLSGen == cls_only by construction) and gen_only learns
nothing. ``--no-template`` uses the config as it is (with ``data.teacher`` set, the trainer has a
teacher write the rationales; see ``launch/build_data.py``).
"""

import hashlib
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

RATIONALES = {
    1: ["The reviewer praises the film and recommends it.", "The review is enthusiastic about the movie.",
        "The critic enjoyed this film and speaks well of it."],
    0: ["The reviewer criticises the film and does not recommend it.", "The review is dismissive of the movie.",
        "The critic disliked this film and speaks poorly of it."],
}


def templated_train_file(out: Path, cfg) -> dict:
    from clsgen_dist.evaluate_cli import default_eval_files
    from clsgen_dist.assets import rotten_tomatoes_splits, read_jsonl

    d = cfg.data
    paths = rotten_tomatoes_splits(seed=cfg.train.seed, train_size=d.default_train_size,
                                   dev_size=d.default_dev_size, test_size=d.default_test_size)
    rows = read_jsonl(paths["train"])
    for r in rows:
        k = int(hashlib.sha1(str(r["id"]).encode()).hexdigest(), 16) % 3
        r["explanation"] = RATIONALES[int(r["label"])][k]
    out.mkdir(parents=True, exist_ok=True)
    train = out / "train_templated.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in rows))
    files = default_eval_files(cfg)
    return {"train": str(train), "dev": files["dev"], "test": files["test"]}


def main() -> int:
    from clsgen_dist.cli import DEFAULT_CONFIG
    from clsgen_dist.compare import main as compare_main
    from clsgen_dist.config import load_config

    argv = sys.argv[1:]
    if "-h" in argv or "--help" in argv or "--output" not in argv[:-1]:
        print(__doc__.strip().split("\n\n")[1], file=sys.stderr)  # the usage lines
        print("\n--no-template: use the config as it is; the rest: launch/compare.py's (see its --help)",
              file=sys.stderr)
        return 0 if ("-h" in argv or "--help" in argv) else 2
    template = "--no-template" not in argv
    argv = [a for a in argv if a != "--no-template"]
    out = Path(argv[argv.index("--output") + 1])
    if template:
        files = templated_train_file(out, load_config(DEFAULT_CONFIG))
        argv += [f"data.train_file={files['train']}", f"data.dev_file={files['dev']}", f"data.test_file={files['test']}",
                 "data.teacher=null"]
    return compare_main(argv)


if __name__ == "__main__":
    sys.exit(main())
