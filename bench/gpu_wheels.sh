#!/usr/bin/env bash
# Prepares what bench/gpu.sh needs on a lent GPU machine, here, before any device time is spent: wheels of our
# pinned runtime and oracle packages for that machine's Python (3.12, x86-64; it has torch and triton, and no
# registry) in .whl/, and the generated gRPC stubs. Then, with the device tool:
#   run(command="bash bench/gpu.sh", carry=[".whl", "protos/loraplex/v1/inference_pb2.py",
#       "protos/loraplex/v1/inference_pb2_grpc.py"], timeout_s=540)
set -euo pipefail
cd "$(dirname "$0")/.."
make -s protos
# The exact pins of requirements*.txt (torch and triton are the machine's own; the rest of their dependencies,
# numpy, huggingface-hub, typer, psutil, pyyaml, are in its image).
pins=$(grep -hE '^(transformers|tokenizers|regex|safetensors|grpcio|grpcio-health-checking|grpcio-reflection|protobuf|prometheus-client|tqdm|llguidance|peft|accelerate)==' \
    requirements.txt requirements-dev.txt | sed 's/ *#.*//')  # (a pin's comment is no requirement)
rm -rf .whl && mkdir .whl
# shellcheck disable=SC2086  # one argument per pin
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_31_x86_64 --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform any -d .whl $pins
du -sh .whl
