#!/usr/bin/env bash
# bench/index/scan_micro.sh: the streaming probe behind the projected-code scan on the
# GPU host's 16 cores (bench/index/scan_micro.c; no project build needed): a layer of 8 KV
# heads x 128K keys as 4-bit codes, 16 layers cycled so that the codes come from DRAM.
set -u
gcc -O2 -march=native -mamx-tile -mamx-int8 -pthread bench/index/scan_micro.c -o /tmp/sm || exit 1
lscpu | grep -E "Model name|MHz|L2|L3|Core|Thread|NUMA"
M=/tmp/sm
SCAN_MODE=read $M 131072 8 16 16 2 64 300
for pf in 0 1 2 3; do SCAN_PF=$pf $M 131072 8 16 16 2 64 300; SCAN_PF=$pf $M 131072 8 16 16 2 80 300; done
SCAN_PF=1 $M 131072 8 16 16 1 64 300
SCAN_PF=1 $M 131072 8 16 16 4 64 300
