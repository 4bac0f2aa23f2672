#!/usr/bin/env bash
# A long run against `wick serve` as real traffic gives it, to watch resident memory: two
# `wick bench-serve` clients (one streaming, one not, 10 workers each, retrying at once on
# 429), a client that opens streams and hangs up after 0.15 s, and a small queue so that most
# requests are refused. Prints the requests submitted so far and the resident memory (MiB) at
# every 1,000 requests, then the server's final counters.
#
# usage: scripts/soak-mixed.sh [-p PORT] [-n REQUESTS] MODEL [wick serve args...]
#   WICK  the wick binary (default: target/release/wick, built if missing)
#
# The first line comes after 500 requests (warm-up): compare the last line with it.
set -euo pipefail
port=8199 target=10500
while getopts "p:n:" o; do
  case $o in
    p) port=$OPTARG ;; n) target=$OPTARG ;;
    *) sed -n '2,11p' "$0"; exit 2 ;;
  esac
done
shift $((OPTIND - 1))
[ $# -gt 0 ] || { sed -n '2,11p' "$0"; exit 2; }
model=$1
shift
cd "$(dirname "$0")/.."
wick=${WICK:-target/release/wick}
[ -x "$wick" ] || cargo build --release --quiet
url=http://127.0.0.1:$port
log=$(mktemp)
"$wick" serve "$model" --port "$port" --max-queue 8 --max-num-seqs 8 "$@" >"$log" 2>&1 &
server=$!
pids=()
cleanup() {
  kill "${pids[@]}" 2>/dev/null || true
  kill "$server" 2>/dev/null || true
}
trap cleanup EXIT
for _ in $(seq 240); do
  curl -sf "$url/health" >/dev/null && break
  kill -0 "$server" 2>/dev/null || { echo "the server ended:"; cat "$log"; exit 1; }
  sleep 0.5
done
name=$(curl -s "$url/v1/models" | sed -n 's/.*"id":"\([^"]*\)".*/\1/p')
"$wick" bench-serve --url "$url" --soak 86400 --stream --concurrency 10 --max-tokens 16 >/dev/null 2>&1 &
pids+=($!)
"$wick" bench-serve --url "$url" --soak 86400 --concurrency 10 --max-tokens 16 >/dev/null 2>&1 &
pids+=($!)
(
  while true; do
    curl -s -m 0.15 -o /dev/null -H 'content-type: application/json' \
      -d "{\"model\":\"$name\",\"messages\":[{\"role\":\"user\",\"content\":\"tell me a long story\"}],\"max_tokens\":64,\"stream\":true}" \
      "$url/v1/chat/completions" || true
  done
) &
pids+=($!)
metric() { awk -v m="$1" '$1 == m { print $2 }' <<<"$2"; }
echo "requests rss_mib"
next=500
while true; do
  kill -0 "$server" 2>/dev/null || { echo "the server ended:"; cat "$log"; exit 1; }
  m=$(curl -s "$url/metrics" || true)
  n=$(metric wick_requests_submitted_total "$m")
  rss=$(metric wick_process_resident_memory_bytes "$m")
  if [ -n "$n" ] && [ "$n" -ge "$next" ]; then
    awk -v n="$n" -v r="$rss" 'BEGIN { printf "%d %.1f\n", n, r / 1048576 }'
    next=$((next + 1000))
  fi
  [ -n "$n" ] && [ "$n" -ge "$target" ] && break
  sleep 0.5
done
kill "${pids[@]}" 2>/dev/null || true
pids=()
sleep 3
curl -s "$url/metrics" | grep -E '^wick_(process_resident_memory_bytes|num_requests_(running|waiting)|kv_blocks_used|requests_finished_total)|code="429"'
