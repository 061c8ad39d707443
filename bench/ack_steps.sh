#!/usr/bin/env bash
# CPU per webhook at several commits, measured the same way: this tree's bench/profile_ack.py run
# against a checkout of each commit in turn, ROUNDS alternating runs of N webhooks, medians.
#   bash bench/ack_steps.sh [--broker redis|rabbitmq] [--rounds 7] [-n 2000] COMMIT...
set -euo pipefail
cd "$(dirname "$0")/.."
broker=redis rounds=7 n=2000 commits=()
while [ $# -gt 0 ]; do
  case $1 in
    --broker) broker=$2; shift 2 ;;
    --rounds) rounds=$2; shift 2 ;;
    -n) n=$2; shift 2 ;;
    *) commits+=("$1"); shift ;;
  esac
done
[ ${#commits[@]} -gt 0 ] || { echo "usage: $0 [--broker B] [--rounds R] [-n N] COMMIT..." >&2; exit 2; }
top=$(pwd) work=$(mktemp -d)
trap 'for c in "${commits[@]}"; do git -C "$top" worktree remove --force "$work/$c" 2>/dev/null || true; done; rm -rf "$work"' EXIT
for c in "${commits[@]}"; do git worktree add -q --detach "$work/$c" "$c"; done
for round in $(seq "$rounds"); do
  for c in "${commits[@]}"; do
    figure=$(cd "$work" && PYTHONPATH="$work/$c" "$top/.venv/bin/python" "$top/bench/profile_ack.py" --time-only \
      -n "$n" --broker "$broker" 2>/dev/null | sed -n 's/.*: \([0-9]*\) us of CPU.*/\1/p')
    echo "round $round/$rounds: $c $figure us" >&2
    echo "$c $figure"
  done
done | awk '{v[$1]=v[$1]" "$2} END {for (k in v) {n=split(v[k],a," "); asort(a); print k, "median", a[int((n+1)/2)], "us of CPU per webhook; runs:" v[k]}}'
