#!/usr/bin/env bash
# Issue #12's acceptance check: the whole suite (`make test test-stress`; it
# was all `make test` before the stress tests got their own target) on a
# fresh clone of this repository, ROUNDS times in a row, each next to HOGS
# busy-loop processes (default 8 = 4 x the 2 cores of the machine it was
# written for).
#
#   bash results/load/run.sh [ROUNDS] [HOGS]    # from a checkout; writes results/load/
#
# Each round starts from an empty compilation cache (.cache/ removed), so it
# compiles everything as a fresh clone does; the virtual environment of the
# first round is kept. The summary line of every round (exit code, wall
# time, pytest's last line of each target, load average) goes to
# results/load/rounds.txt and the full pytest output to
# results/load/round-N.log.
set -uo pipefail
ROUNDS=${1:-3}
HOGS=${2:-8}
HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
CLONE=${CLONE:-/tmp/defjax-load-clone}
rm -rf "$CLONE"
git clone -q "$REPO" "$CLONE"
COMMIT=$(git -C "$CLONE" rev-parse --short HEAD)
echo "# $(date -u +%F) commit $COMMIT, $(nproc) cores, $HOGS busy loops, $ROUNDS rounds" >> "$HERE/rounds.txt"
for round in $(seq 1 "$ROUNDS"); do
  rm -rf "$CLONE/.cache"
  pids=()
  for _ in $(seq 1 "$HOGS"); do
    bash -c 'while :; do :; done' & pids+=($!)
  done
  start=$(date +%s)
  (cd "$CLONE" && make test test-stress) > "$HERE/round-$round.log" 2>&1
  rc=$?
  load=$(cut -d' ' -f1-3 /proc/loadavg)
  kill "${pids[@]}" 2>/dev/null; wait "${pids[@]}" 2>/dev/null
  secs=$(( $(date +%s) - start ))
  last=$(grep -E '(passed|failed|error)' "$HERE/round-$round.log" | tail -2 | paste -sd ';')
  echo "round $round: exit $rc, ${secs} s, load average $load: $last" | tee -a "$HERE/rounds.txt"
done
