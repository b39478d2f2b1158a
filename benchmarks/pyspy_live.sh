#!/bin/bash
# py-spy on the terra server under benchmarks.live's load (issue 10's profile, second view):
# N continuous talkers (spread clocks), the server sampled for 15 s mid-run. py-spy sees
# Python threads only: CTranslate2 computes in its own native threads, so the recognizer
# threads look idle while they wait on it; what it shows is the Python work outside the
# model (event loop, spooling, VAD). Run under the CPU lock:
#   flock /work/coord/cpu.lock bash benchmarks/pyspy_live.sh 16
set -euo pipefail
N=${1:-16}
OUT=benchmarks/results/pyspy_live${N}.txt
.venv/bin/python -m benchmarks.live --load continuous --phases spread --levels "$N" \
    --terra-only --seconds 30 --name "live_pyspy${N}" &
B=$!
P=""
for _ in $(seq 120); do
    P=$(pgrep -P "$B" -f "terra.cli serve" | head -1 || true)
    [ -n "$P" ] && break
    sleep 0.5
done
for _ in $(seq 120); do ss -ltnp 2>/dev/null | grep -q "pid=$P," && break; sleep 0.5; done
sleep 12  # the talkers are going
.venv/bin/py-spy record -p "$P" -d 15 -r 40 --threads --nonblocking --format raw -o "$OUT"
wait "$B"
