"""Record a finished training run's test metrics for docs/recipes.md: ``python docs/record_result.py RECIPE RUN_DIR``.

Checks that the run was made with the recipe as it stands (the run folder's resolved
``recipe.toml`` must equal the recipe file's resolved form), then writes
``docs/results/<recipe stem>.json`` with the test metrics, the best dev epoch, the machine, the
run's date and the commit at which it was recorded. ``python docs/generate.py`` renders every recorded result into docs/recipes.md.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "docs" / "results"
KINDS = ("baseline", "paper", "cross-paper")
METRICS = ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "rsum")


def _commit() -> str:
    out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    return out.stdout.strip() or "unknown"


def _reranked(run_dir: Path, method: str) -> dict:
    """``itmkit eval RUN/model_best.safetensors --rerank METHOD --json`` on the run's test split, on the CPU."""
    command = [sys.executable, "-m", "itmkit", "eval", str(run_dir / "model_best.safetensors"), "--rerank", method,
               "--json", "--device", "cpu"]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stderr}")
    print(done.stderr, end="", file=sys.stderr)  # the re-ranking's note on the test set's caption grouping
    return json.loads(done.stdout)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipe", type=Path)
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--minutes", type=float, help="wall-clock minutes of the run, if known")
    parser.add_argument("--note", default="", help="one line on how the run went (machine load, resumes)")
    parser.add_argument("--kind", choices=KINDS, default="paper",
                        help="baseline, one paper's recipe, or a cross-paper combination (table order)")
    parser.add_argument("--rerank", choices=("mtfn-rr",), default=None,
                        help="record the run's best checkpoint re-ranked (itmkit eval --rerank) as its own row,"
                             " docs/results/<recipe stem>.<rerank>.json, the plain metrics kept beside")
    args = parser.parse_args(argv)

    from itmkit.recipe import load_recipe

    recipe = load_recipe(args.recipe).to_dict()
    ran = load_recipe(args.run_dir / "recipe.toml").to_dict()
    for d in (recipe, ran):
        d["recipe"].pop("description", None)
    if recipe != ran:
        print(f"{args.run_dir} was trained with a different recipe than {args.recipe} as it stands", file=sys.stderr)
        return 1
    test = json.loads((args.run_dir / "test_metrics.json").read_text())
    extra: dict = {}
    if args.rerank:
        reranked = _reranked(args.run_dir, args.rerank)
        plain = reranked.pop("before_rerank")
        if any(abs(plain[k] - float(test[k])) > 1e-9 for k in METRICS):  # the same test split, scored again
            print(f"{args.run_dir}: scoring the best checkpoint again gives other plain metrics than the run's"
                  f" test_metrics.json; not recorded", file=sys.stderr)
            return 1
        test = {**test, **reranked}
        extra = {"rerank": args.rerank, "before_rerank": {k: round(float(plain[k]), 2) for k in METRICS}}
    record = {
        "kind": args.kind,
        "recipe": args.recipe.relative_to(ROOT).as_posix() if args.recipe.is_absolute() else args.recipe.as_posix(),
        "data": ran["data"]["path"],
        "split": test["split"],
        "protocol": test["protocol"],
        "metrics": {k: round(float(test[k]), 2) for k in METRICS},
        "best_epoch": int(test["best_epoch"]) + 1,
        "epochs": ran["train"]["epochs"],
        "minutes": args.minutes,
        "machine": f"{platform.machine()}, {platform.system()}",
        "run_date": date.fromtimestamp((args.run_dir / "test_metrics.json").stat().st_mtime).isoformat(),
        "recorded_at_commit": _commit(),  # the recipe was checked equal to the run's at this commit
        "note": args.note,
        **extra,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    target = RESULTS / (f"{args.recipe.stem}.{args.rerank}.json" if args.rerank else f"{args.recipe.stem}.json")
    target.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {target}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
