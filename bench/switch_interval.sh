#!/usr/bin/env bash
# Does the GIL hand-over between the event loop and the engine thread cap throughput at short
# step times? Runs the server at 64 streams over HTTP with several sys.setswitchinterval values
# (Python's default: 5 ms — a thread that wants the GIL may wait that long for it, and the engine
# thread wants it back after every llama_decode). GPU: a synthetic 1.17B Q4_K_M fully offloaded
# (as bench/gpu_check.sh); QUICK=1: a tiny synthetic model on the CPU. Results go to $OUT.
#   SKIP_INSTALL=1 QUICK=1 PY=.venv/bin/python bash bench/switch_interval.sh
set -euo pipefail
OUT=${OUT:-/tmp/si-out}; mkdir -p "$OUT"
PY=${PY:-python3}
if [ -z "${SKIP_INSTALL:-}" ]; then
  rm -rf /tmp/site; $PY -m pip install -q --no-index --no-deps --target /tmp/site .gpu/wheels/*.whl
  export PYTHONPATH=/tmp/site:$PWD
fi
if [ -n "${QUICK:-}" ]; then
  SHAPE=(--hidden 64 --layers 2 --heads 4 --kv-heads 2 --ffn 256); NGL=0; GPU=()
else
  SHAPE=(--hidden 2048 --layers 16 --heads 32 --kv-heads 8 --ffn 8192); NGL=99; GPU=(--use-gpu)
fi
STREAMS=${STREAMS:-64}
INTERVALS=${INTERVALS:-"0.005 0.0005 0.0001"}
MODEL=${MODEL:-}  # a GGUF to use instead of the synthetic model
if [ -z "$MODEL" ]; then
  $PY .gpu/make_synthetic_gguf.py --vocab .gpu/smollm2-vocab.gguf -o /tmp/m-f16.gguf "${SHAPE[@]}" --ctx 8192 > /dev/null
  $PY -c "
import llama_cpp
p = llama_cpp.llama_model_quantize_default_params(); p.ftype = 15
assert llama_cpp.llama_model_quantize(b'/tmp/m-f16.gguf', b'/tmp/m.gguf', p) == 0" > /dev/null 2>&1
  MODEL=/tmp/m.gguf
fi
PORT=8089
for si in $INTERVALS; do
  $PY -c "import sys, runpy; sys.setswitchinterval($si); sys.argv = ['cria', *sys.argv[1:]]; runpy.run_module('cria', run_name='__main__')" \
    --model "$MODEL" "${GPU[@]}" --gpu-layers $NGL --parallel "$STREAMS" --context-size ${CONTEXT:-1024} \
    --host 127.0.0.1 --port $PORT --log-level warning > "$OUT/server-$si.log" 2>&1 &
  SERVER=$!
  for i in $(seq 1 240); do
    kill -0 $SERVER 2>/dev/null || { tail -5 "$OUT/server-$si.log"; exit 1; }
    $PY -c "import httpx,sys; sys.exit(httpx.get('http://127.0.0.1:$PORT/health').status_code != 200)" 2>/dev/null && break
    sleep 0.5
  done
  echo "switchinterval $si"
  $PY bench/loadgen.py --base-url http://127.0.0.1:$PORT/v1 --endpoint completions -c "$STREAMS" -n "${REQUESTS:-$((STREAMS * 2))}" \
    --max-tokens 128 --json "$OUT/http-$si.json" > "$OUT/http-$si.txt" 2>&1 || true
  grep -E "aggregate|ITL" "$OUT/http-$si.txt" || tail -3 "$OUT/http-$si.txt"
  kill $SERVER; wait $SERVER 2>/dev/null || true
done
