"""Old code against new, side by side (docs/benchmarks.md): used for the one-loop change
(issue 7, old tree 6a66de0) and the layer packages (issue 17, old tree 974f4eb).

    git worktree add /tmp/psm-old 974f4eb      # the code before the change
    python scripts/bench_old_vs_new.py 6 /tmp/psm-old/src

Runs psm.bench.train's loop and ensemble timers (paper MLP on TY, batch 512, 1 thread) for K =
1, 10, 50, and psm.bench.nll's exact-trace NLL of 500 TY points through a 10-block TPSM (RK4,
100 steps), from each source tree in alternating subprocesses, ROUNDS rounds, and prints the
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
out = {"loop": k * steps / t_loop, "ens": k * steps / t_ens}
if k == 10:  # the likelihood: points per second
    from psm.bench.nll import build_model, time_nll
    model = build_model("TPSM-10")
    x = torch.randn(500, 2, generator=torch.Generator().manual_seed(0))
    time_nll(model, x[:50], 10)  # warm-up
    out["nll"] = 500 / time_nll(model, x, 100)
print(json.dumps(out))
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
        for key in ("loop", "ens", "nll"):
            if key not in res["old"][k][0]:
                continue
            o = [r[key] for r in res["old"][k]]
            n = [r[key] for r in res["new"][k]]
            if math.isnan(o[0]):
                continue
            ratios = [b / a for a, b in zip(o, n)]
            print(
                f"K={k} {key}: old best {max(o):.0f}, new best {max(n):.0f} "
                f"{'points' if key == 'nll' else 'block-steps'}/s; "
                f"new/old best {max(n) / max(o):.3f}, paired median {statistics.median(ratios):.3f}"
            )


if __name__ == "__main__":
    main()
