# loraplex server image.
#   docker build -t loraplex .
#   docker run -p 50051:50051 -p 9090:9090 -v "$PWD/my-adapters:/adapters:ro" loraplex
# The builder makes one self-contained virtualenv (torch, the pinned dependencies, the generated gRPC
# stubs and the project); the runtime stage copies that venv and the shipped built-in model
# (models/builtin: `--model default` and its demo adapters) and runs as a fixed non-root UID.
# CPU torch by default; for CUDA pass e.g.
#   --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128
# (the host then needs only the NVIDIA driver and container toolkit).

ARG PYTHON_IMAGE=python:3.11.7-slim-bookworm

FROM ${PYTHON_IMAGE} AS builder

ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:$PATH

WORKDIR /src
# A C compiler for the native adapter kernel (built below, after the source is copied). Not pinned: the
# base image is, and Debian replaces libc6-dev's exact version with each security update.
# hadolint ignore=DL3008
RUN apt-get update && apt-get install --yes --no-install-recommends gcc libc6-dev && rm -rf /var/lib/apt/lists/*
# Dependencies before the source so that code edits reuse these layers. torch goes first and alone,
# from its own index: every range in requirements.txt is then satisfied by it and no other build is pulled.
RUN python -m venv /opt/venv \
 && pip install --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"
COPY requirements.txt ./
RUN pip install -r requirements.txt

COPY . .
# Generate the stubs into protos/ (they are not in the repository), install the project with them
# into the venv, then drop grpcio-tools: only generation needs it.
RUN python -m grpc_tools.protoc -I. --python_out=. --grpc_python_out=. --pyi_out=. protos/loraplex/v1/*.proto \
 && pip install --no-deps . \
 && pip uninstall --yes grpcio-tools
# The native CPU adapter kernel, built here because the runtime image has no compiler: both variants (x86
# CPUs with AVX-512, and with AVX2 + FMA + F16C; elsewhere the server uses its torch path and says so in the log).
RUN mkdir -p /opt/loraplex/kernels && LORAPLEX_KERNEL_DIR=/opt/loraplex/kernels python -m adapters.cpu_kernel


FROM ${PYTHON_IMAGE} AS runtime

# A fixed UID/GID so that Kubernetes runAsNonRoot/runAsUser can match it. /models and /adapters are
# created owned by that user, so new named volumes mounted there inherit the ownership.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    HF_HUB_OFFLINE=1 \
    HF_HOME=/home/loraplex/.cache/huggingface \
    LORAPLEX_BUILTIN=/opt/loraplex/builtin \
    LORAPLEX_KERNEL_DIR=/opt/loraplex/kernels
RUN groupadd --gid 10001 loraplex \
 && useradd --uid 10001 --gid 10001 --create-home --home-dir /home/loraplex --shell /usr/sbin/nologin loraplex \
 && mkdir -p "${HF_HOME}" /models /adapters \
 && chown -R 10001:10001 /home/loraplex /models /adapters

# Root-owned and so read-only for the server: code, dependencies and the built-in model.
COPY --from=builder /opt/venv /opt/venv
COPY --from=builder /src/models/builtin /opt/loraplex/builtin
COPY --from=builder /opt/loraplex/kernels /opt/loraplex/kernels

WORKDIR /home/loraplex
USER 10001:10001
EXPOSE 50051 9090
VOLUME ["/models", "/adapters"]

# Health goes through grpc.health.v1 (service "" turns SERVING once the model is loaded and warm).
HEALTHCHECK --interval=30s --timeout=10s --start-period=120s --retries=3 \
    CMD ["python", "-m", "server.healthcheck", "--addr", "127.0.0.1:50051"]

# Exec form: the server is PID 1 and receives SIGTERM itself, then drains for --grace-period
# seconds. `docker stop` waits only 10 s before SIGKILL; give it --time (or --stop-timeout on run)
# above the grace period to let in-flight requests finish.
STOPSIGNAL SIGTERM
ENTRYPOINT ["loraplex", "serve"]
CMD ["--model", "default", "--host", "0.0.0.0", "--port", "50051", \
     "--metrics-host", "0.0.0.0", "--metrics-port", "9090", "--adapter-root", "/adapters"]
