#!/bin/bash
# tmux captures of a comptrust command at 0 s, 30 s, 60 s and at its end (run under the model lock):
#   capture.sh NAME 'command'     -> NAME_0s.txt NAME_30s.txt NAME_60s.txt NAME_end.txt, NAME_wall.txt
set -u
name=$1; cmd=$2; dir=$(dirname "$0")
sess="cap_${name}_$$"
tmux kill-session -t "$sess" 2>/dev/null
start=$(date +%s.%N)
tmux new-session -d -x 160 -y 40 -s "$sess" "cd /work/main && . .venv/bin/activate && $cmd; echo EXIT=\$?; sleep 600"
for t in 0 30 60; do
  now=$(date +%s.%N); wait=$(echo "$start + $t - $now" | bc); (( $(echo "$wait > 0" | bc) )) && sleep "$wait"
  tmux capture-pane -p -t "$sess" > "$dir/${name}_${t}s.txt"
done
until tmux capture-pane -p -t "$sess" | grep -q "EXIT="; do sleep 2; done
end=$(date +%s.%N)
tmux capture-pane -p -t "$sess" > "$dir/${name}_end.txt"
echo "wall $(echo "$end - $start" | bc) s; load $(cut -d' ' -f1-3 /proc/loadavg)" > "$dir/${name}_wall.txt"
tmux kill-session -t "$sess"
