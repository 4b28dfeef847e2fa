#!/usr/bin/env bash
# GPU check (issue 3 §4): Cria on a synthetic 1.17B Llama (Q4_K_M) fully offloaded, at 1, 16 and
# 64 streams: the engine alone (bench/engine_overhead.py, with and without --overlap) and the
# whole server over HTTP (bench/loadgen.py; --engine-process and --overlap-output at auto, i.e.
# on, then each turned off at 64 streams); and greedy sampling on the host vs in the graph. Run from the repository root on the GPU machine, with ../shared/gpu copied
# into .gpu/ (plus the wheels of Cria's pure-Python dependencies). Results go to $OUT.
#   SKIP_INSTALL=1 QUICK=1 bash bench/gpu_check.sh    # a dry run on the CPU with a tiny model
set -euo pipefail
OUT=${OUT:-/tmp/gpu-out}; mkdir -p "$OUT"
PY=${PY:-python3}
if [ -z "${SKIP_INSTALL:-}" ]; then
  rm -rf /tmp/site; $PY -m pip install -q --no-index --no-deps --target /tmp/site .gpu/wheels/*.whl
  export PYTHONPATH=/tmp/site:$PWD
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.txt" 2>&1 || true
if [ -n "${QUICK:-}" ]; then
  SHAPE=(--hidden 64 --layers 2 --heads 4 --kv-heads 2 --ffn 256); STREAMS=(1 4); NGL=0
else
  SHAPE=(--hidden 2048 --layers 16 --heads 32 --kv-heads 8 --ffn 8192); STREAMS=(1 16 64); NGL=99
fi
$PY .gpu/make_synthetic_gguf.py --vocab .gpu/smollm2-vocab.gguf -o /tmp/m-f16.gguf "${SHAPE[@]}" --ctx 8192 > "$OUT/model.txt"
$PY - <<'PYEOF' >> "$OUT/model.txt"
import llama_cpp, time
p = llama_cpp.llama_model_quantize_default_params()
p.ftype = 15  # LLAMA_FTYPE_MOSTLY_Q4_K_M, as in the reference figures
t = time.time()
rc = llama_cpp.llama_model_quantize(b"/tmp/m-f16.gguf", b"/tmp/m.gguf", p)
print("quantize rc", rc, "in", round(time.time() - t, 1), "s; supports_gpu_offload", llama_cpp.llama_supports_gpu_offload())
PYEOF
for s in "${STREAMS[@]}"; do
  for o in "" overlap; do  # the step's text work after sampling, or while the next step decodes
    $PY bench/engine_overhead.py --model /tmp/m.gguf --gpu-layers $NGL --streams "$s" --max-tokens 256 \
      --threads 4 ${o:+--overlap} --json "$OUT/engine-$s$o.json" > /dev/null 2> "$OUT/engine-$s$o.log" \
      || tail -5 "$OUT/engine-$s$o.log"
    echo "engine, $s streams ${o:-no overlap}: $(grep -h tokens_per_s "$OUT/engine-$s$o.json" || true)"
  done
done
for s in "${STREAMS[@]}"; do  # greedy on the host vs inside the graph (bench/backend_sampling.py)
  [ "$s" -gt 1 ] || continue
  $PY bench/backend_sampling.py --model /tmp/m.gguf --gpu-layers $NGL --seqs "$s" --threads 4 \
    > "$OUT/backend-sampling-$s.jsonl" 2> "$OUT/backend-sampling-$s.log" || tail -5 "$OUT/backend-sampling-$s.log"
  echo "backend sampling, $s sequences: $(tail -1 "$OUT/backend-sampling-$s.jsonl")"
done
PORT=8089
$PY -m cria --model /tmp/m.gguf --use-gpu --gpu-layers $NGL --parallel 64 --context-size 1024 \
  --host 127.0.0.1 --port $PORT --log-level warning > "$OUT/server.log" 2>&1 &
SERVER=$!
trap 'kill $SERVER 2>/dev/null || true' EXIT
for i in $(seq 1 120); do
  $PY -c "import httpx,sys; sys.exit(httpx.get('http://127.0.0.1:$PORT/health').status_code != 200)" 2>/dev/null && break
  sleep 0.5
done
for s in "${STREAMS[@]}"; do
  $PY bench/loadgen.py --base-url http://127.0.0.1:$PORT/v1 --endpoint completions -c "$s" -n $((s * 2 > 4 ? s * 2 : 4)) \
    --max-tokens 128 --json "$OUT/http-$s.json" > "$OUT/http-$s.txt" 2>&1 || true
  grep -E "aggregate|TTFT|ITL|errors" "$OUT/http-$s.txt" || tail -3 "$OUT/http-$s.txt"
done
$PY -c "import httpx,json; print(json.dumps(httpx.get('http://127.0.0.1:$PORT/health').json()))" > "$OUT/health.json" || true
cat "$OUT/health.json"
kill $SERVER 2>/dev/null || true; wait $SERVER 2>/dev/null || true
# The same server without the engine process, then without the overlap either (the second
# session's configuration), at the most streams: what each of the two changes brings.
s=${STREAMS[-1]}
for variant in "--engine-process off" "--engine-process off --overlap-output off"; do
  tag=$(echo "$variant" | tr -d ' -' | sed 's/engineprocess/ep-/; s/overlapoutput/-ov-/')
  $PY -m cria --model /tmp/m.gguf --use-gpu --gpu-layers $NGL --parallel 64 --context-size 1024 \
    --host 127.0.0.1 --port $PORT --log-level warning $variant > "$OUT/server-$tag.log" 2>&1 &
  SERVER=$!
  for i in $(seq 1 120); do
    $PY -c "import httpx,sys; sys.exit(httpx.get('http://127.0.0.1:$PORT/health').status_code != 200)" 2>/dev/null && break
    sleep 0.5
  done
  $PY bench/loadgen.py --base-url http://127.0.0.1:$PORT/v1 --endpoint completions -c "$s" -n $((s * 2)) \
    --max-tokens 128 --json "$OUT/http-$tag-$s.json" > "$OUT/http-$tag-$s.txt" 2>&1 || true
  echo "$variant, $s streams:"; grep -E "aggregate|TTFT|ITL|errors" "$OUT/http-$tag-$s.txt" || tail -3 "$OUT/http-$tag-$s.txt"
  kill $SERVER 2>/dev/null || true; wait $SERVER 2>/dev/null || true
done
