"""The training loop before and after issue 7, side by side (docs/benchmarks.md).

    git worktree add /tmp/psm-old 6a66de0      # the code before the one-loop change
    python scripts/bench_old_vs_new.py 6 /tmp/psm-old/src

Runs psm.bench.train's loop and ensemble timers (paper MLP on TY, batch 512, 1 thread) for K =
1, 10, 50 from each source tree in alternating subprocesses, ROUNDS rounds, and prints the
best rates and the median of the paired new/old ratios.
"""

import json
import math
import statistics
import subprocess
import sys
from pathlib import Path

SNIPPET = r"""
import sys, json, tempfile, torch
from pathlib import Path
torch.set_num_threads(1)
from psm.bench.train import time_loop, time_ensemble
k, steps = int(sys.argv[1]), int(sys.argv[2])
with tempfile.TemporaryDirectory() as d:
    root = Path(d)
    t_loop = time_loop(root, k, steps, 512) if k <= 10 else float("nan")
    t_ens = time_ensemble(root, k, steps, 512)
print(json.dumps({"loop": k * steps / t_loop, "ens": k * steps / t_ens}))
"""
SIZES = ((1, 2000), (10, 200), (50, 40))  # (K, steps per block)


def main() -> None:
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 3
    old = sys.argv[2] if len(sys.argv) > 2 else "/tmp/psm-old/src"
    code = {"old": old, "new": str(Path(__file__).resolve().parents[1] / "src")}
    res: dict[str, dict[int, list[dict]]] = {c: {} for c in code}
    for rep in range(rounds):
        for k, steps in SIZES:
            for c in ("old", "new") if rep % 2 == 0 else ("new", "old"):
                out = subprocess.run(
                    [sys.executable, "-c", SNIPPET, str(k), str(steps)],
                    capture_output=True, text=True, check=True,
                    env={"PYTHONPATH": code[c], "PATH": "/usr/bin"},
                )  # fmt: skip
                r = json.loads(out.stdout)
                res[c].setdefault(k, []).append(r)
                print(rep, k, c, r, flush=True)
    for k, _ in SIZES:
        for key in ("loop", "ens"):
            o = [r[key] for r in res["old"][k]]
            n = [r[key] for r in res["new"][k]]
            if math.isnan(o[0]):
                continue
            ratios = [b / a for a, b in zip(o, n)]
            print(
                f"K={k} {key}: old best {max(o):.0f}, new best {max(n):.0f} block-steps/s; "
                f"new/old best {max(n) / max(o):.3f}, paired median {statistics.median(ratios):.3f}"
            )


if __name__ == "__main__":
    main()
