#!/usr/bin/env bash
# Our PPOTrainer against TRL 1.16 GRPO and the bare PPO loop on the identical work of the peer benchmark
# (../shared/bench/peer: its task.py, grpo_trl116.py and bare_ppo_loop.py are run from there, not copied).
# Prints each run's samples/s, the medians, and the ratios that matter:
#   ours ÷ bare PPO loop (samples/s; target ≥ 0.9)   and   ours ÷ GRPO (time per step; target ≤ 1.25)
# Usage (from the repository root):  bash benchmarks/peer/run_ours.sh [N=3] [EPISODES=512]
# The CPU may be shared: compare ratios within one run, not absolute numbers across runs.
set -u
HERE="$(cd "$(dirname "$0")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
PEER="${PEER_DIR:-$ROOT/../shared/bench/peer}"
N=${1:-3}
EP=${2:-512}
PY=${PYTHON:-python}
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 HF_HUB_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1 TRL_EXPERIMENTAL_SILENCE=1 \
       TOKENIZERS_PARALLELISM=false PYTHONWARNINGS=ignore
export PEER_HOME=${PEER_HOME:-/tmp/peer-bench}
RES=${RES:-$PEER_HOME/logs/ours_$(date +%Y%m%d_%H%M%S)}
mkdir -p "$RES"
(cd "$PEER" && $PY task.py > /dev/null 2>&1)   # builds the models once

run() {  # name cfg script-dir script args...
  local name=$1 cfg=$2 dir=$3; shift 3
  local f="$RES/${name}_${cfg}_r$i.txt"
  (cd "$dir" && $PY "$@" --episodes "$EP" > "$f" 2>&1)
  echo "$name $cfg r$i: $(grep -o '"samples_per_s": [0-9.]*' "$f")"
}
for e in 1 4; do
  for i in $(seq 1 "$N"); do   # interleaved, so a burst of load hits all three alike
    run ours     e$e "$ROOT" benchmarks/peer/ppo_ours.py --epochs $e --peer "$PEER"
    run grpo116  e$e "$PEER" grpo_trl116.py --epochs $e --out "$RES/grpo_out"
    run bare_ppo e$e "$PEER" bare_ppo_loop.py --epochs $e --gen manual
  done
done
$PY - "$RES" <<'PYEOF'
import glob, json, os, statistics, sys
res = sys.argv[1]
rows = {}
for f in glob.glob(os.path.join(res, "*.txt")):
    name, cfg, _ = os.path.basename(f)[:-4].rsplit("_", 2)
    for line in open(f):
        if line.startswith("RESULT "):
            rows.setdefault((name, cfg), []).append(json.loads(line[7:])["samples_per_s"])
med = {k: statistics.median(v) for k, v in rows.items()}
print(f"\nmedian samples/s of {max(len(v) for v in rows.values())} runs (OMP_NUM_THREADS=1)")
print("| epochs | ours | TRL 1.16 GRPO | bare PPO loop | ours ÷ bare (≥ 0.9) | ours time/step ÷ GRPO (≤ 1.25) |")
print("|---|---|---|---|---|---|")
for cfg in ("e1", "e4"):
    o, g, b = med.get(("ours", cfg)), med.get(("grpo116", cfg)), med.get(("bare_ppo", cfg))
    if None in (o, g, b):
        continue
    print(f"| {cfg} | {o:.1f} | {g:.1f} | {b:.1f} | {o / b:.2f} | {g / o:.2f} |")
print(f"logs in {res}")
PYEOF
