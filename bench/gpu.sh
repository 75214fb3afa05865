#!/usr/bin/env bash
# The GPU benchmarks, for a lent GPU machine (see bench/RESULTS.md for earlier runs). That machine has
# python3 (3.12) with a CUDA torch and triton but not our pinned packages and no registry: first run
# `bash bench/gpu_wheels.sh` here (wheels in .whl/, gRPC stubs), then with the device tool:
#   run(command="bash bench/gpu.sh", carry=[".whl", "protos/loraplex/v1/inference_pb2.py",
#       "protos/loraplex/v1/inference_pb2_grpc.py"], timeout_s=540)
# Output goes to $OUT (or ./gpu-results) for RESULTS.md.
# One lease, one try: a step that fails is recorded and the next still runs (the exit status says one failed).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1  # lines reach tee (and $OUT) as printed: a run cut at the time limit keeps them
out="${OUT:-gpu-results}"
mkdir -p "$out"
failed=0
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 1
export PYTHONPATH=/tmp/site:.
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
python3 -c "import torch; print('torch', torch.__version__, torch.version.cuda)" | tee -a "$out/gpu.txt"
# The triton kernel's results first (its timings mean nothing if they are wrong), then torch vs triton side by side.
variants=torch/auto,triton/auto
python3 bench/kernel_check.py --device cuda --kernel triton 2>&1 | tee "$out/kernel_check.txt" \
    || { failed=1; variants=torch/auto; }  # wrong results: its timings would mean nothing
python3 bench/adapter_kinds.py --device cuda --repeats 3 --variants "$variants" 2>&1 | tee "$out/adapter_kinds.txt" \
    || failed=1
# PEFT's and HF's own generate (configs c, d) were measured on 2026-11-23 and their code has not changed: the
# lease's minutes go to the engine
python3 bench/mixed_adapters.py --device cuda --repeats 3 --skip-peft 2>&1 | tee "$out/mixed_adapters.txt" || failed=1
# Short ones last: prompt scores projected after the forward vs inside it (whose chunks are cut: more forwards), at
# Qwen's vocabulary; n samples of one prompt against n prompts (one prefill); the prefix cache.
timeout 120 python3 bench/prompt_logprobs.py --device cuda --vocab 152064 --rows 32 --length 512 --rounds 5 2>&1 \
    | tee "$out/prompt_logprobs.txt" || failed=1
timeout 120 python3 bench/shared_prefill.py --device cuda --repeats 3 2>&1 | tee "$out/shared_prefill.txt" || failed=1
# Chat turns with and without the prefix cache (two servers side by side): the copies against the prefill they save.
timeout 120 python3 bench/prefix_cache.py --device cuda --requests 32 --repeats 3 2>&1 | tee "$out/prefix_cache.txt" \
    || failed=1
# Held outputs (response_format): llguidance's masks on the host, the bias made and added on the GPU.
timeout 120 python3 bench/response_format.py --device cuda --repeats 3 2>&1 | tee "$out/response_format.txt" \
    || failed=1
exit $failed
