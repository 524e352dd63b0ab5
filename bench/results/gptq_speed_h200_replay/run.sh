pip install -q --no-deps --no-index --target /tmp/pp .whl/*.whl >/dev/null 2>&1
R=$PWD
B="bench/gptq_speed.py --layers 32 --samples 128 --seq 2048 --lowbit-layers-small 0 --offload on --untimed-only --time-budget 300"
t0=$(date +%s)
show() { grep -E "^\[lowbit\] 32 layers|^\[peer\] total" $1 | cut -c1-260; }
PYTHONPATH=src timeout 230 python $B --peer-layers 4 --peer-path /tmp/pp --out $OUT/new > $OUT/new.log 2>&1; show $OUT/new.log
PYTHONPATH=src timeout 120 python $B --peer-layers 0 --no-replay --out $OUT/norep > $OUT/norep.log 2>&1; show $OUT/norep.log
(cd devrun/old && PYTHONPATH=src timeout 120 python $B --peer-layers 0 --out $OUT/old > $OUT/old.log 2>&1); show $OUT/old.log
left=$((560 - $(date +%s) + t0)); echo "left $left"
[ $left -gt 100 ] && PYTHONPATH=src timeout $((left - 5)) python $B --peer-layers 0 --asym-alpha 0 --out $OUT/plain > $OUT/plain.log 2>&1; show $OUT/plain.log
left=$((570 - $(date +%s) + t0)); echo "left $left"
[ $left -gt 100 ] && PYTHONPATH=src timeout $((left - 5)) python $B --peer-layers 0 --out $OUT/new2 > $OUT/new2.log 2>&1; show $OUT/new2.log
nvidia-smi --query-gpu=name --format=csv,noheader
