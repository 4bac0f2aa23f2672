#!/usr/bin/env bash
# Runs llama.cpp's llama-bench and `wick bench` alternately on the same GGUF files, on the same
# machine, in one run, and prints a table of medians and wick/llama.cpp ratios.
#
# usage: scripts/bench-vs-llama-cpp.sh [-t THREADS] [-r ROUNDS] [-p N] [-n N] [-d DEPTH] FILE.gguf...
#   LLAMA_BIN  llama.cpp's bin directory (default: what ../shared/tools/build-llama-cpp.sh prints,
#              building it first if needed)
#   WICK       the wick binary (default: target/release/wick, built if missing)
#
# Each round runs llama-bench (-r 1) then wick bench (--repetitions 1) on every file, so both
# see the same machine state; medians are over rounds. wick's report adds the machine's memory
# bandwidth and tg's share of that ceiling.
set -euo pipefail
threads=2 rounds=3 np=512 ng=128 depth=0
while getopts "t:r:p:n:d:" o; do
  case $o in
    t) threads=$OPTARG ;; r) rounds=$OPTARG ;; p) np=$OPTARG ;; n) ng=$OPTARG ;; d) depth=$OPTARG ;;
    *) sed -n '2,12p' "$0"; exit 2 ;;
  esac
done
shift $((OPTIND - 1))
[ $# -gt 0 ] || { sed -n '2,12p' "$0"; exit 2; }
files=()
for f in "$@"; do files+=("$(realpath "$f")"); done
cd "$(dirname "$0")/.."
set -- "${files[@]}"
bin=${LLAMA_BIN:-$(bash ../shared/tools/build-llama-cpp.sh | tail -1)}
wick=${WICK:-target/release/wick}
[ -x "$wick" ] || cargo build --release --quiet
out=$(mktemp -d)
for r in $(seq "$rounds"); do
  for f in "$@"; do
    tag=$(basename "$f" .gguf)
    "$bin/llama-bench" -m "$f" -t "$threads" -p "$np" -n "$ng" -d "$depth" -r 1 -o json \
      > "$out/llama.$tag.$r.json" 2>/dev/null
    "$wick" bench --model "$f" --device cpu --threads "$threads" -p "$np" -n "$ng" -d "$depth" \
      --repetitions 1 --json > "$out/wick.$tag.$r.json" 2>/dev/null
    echo "round $r/$rounds: $tag done" >&2
  done
done
python3 - "$out" "$rounds" "$np" "$ng" "$depth" "$@" <<'PY'
import json, os, statistics, sys
out, rounds, np_, ng, depth = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]
files = sys.argv[6:]
med = lambda v: statistics.median(v) if v else float("nan")
print(f"| file | llama.cpp pp{np_} | wick pp{np_} | ratio | llama.cpp tg{ng} | wick tg{ng} | ratio | wick tg GB/s | share of bandwidth ceiling |")
print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
isa = bw = None
for f in files:
    tag = os.path.basename(f)[:-5]
    lpp, ltg, wpp, wtg, wgb, share = [], [], [], [], [], []
    for r in range(1, rounds + 1):
        for row in json.load(open(f"{out}/llama.{tag}.{r}.json")):
            (lpp if row["n_gen"] == 0 else ltg).append(row["avg_ts"])
        w = json.load(open(f"{out}/wick.{tag}.{r}.json"))
        if w.get("pp_tok_s"): wpp.append(w["pp_tok_s"])
        if w.get("tg_tok_s"): wtg.append(w["tg_tok_s"])
        if w.get("tg_gb_s"): wgb.append(w["tg_gb_s"])
        if w.get("tg_share_of_ceiling"): share.append(w["tg_share_of_ceiling"])
        isa, bw = w.get("cpu_isa"), w.get("memory_bandwidth_gb_s")
    print(f"| {tag} | {med(lpp):.1f} | {med(wpp):.1f} | {med(wpp)/med(lpp):.2f}x | {med(ltg):.2f} | {med(wtg):.2f} | {med(wtg)/med(ltg):.2f}x | {med(wgb):.2f} | {100*med(share):.0f}% |")
print(f"\nwick tier {isa}; memory read bandwidth {bw:.2f} GB/s; depth {depth}; medians of {rounds} alternating rounds")
PY
rm -rf "$out"
