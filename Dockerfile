# syntax=docker/dockerfile:1
# One image for every Bazaar service: `bazaar up` (the whole system), or
# `bazaar serve <service>` (one per container, as Compose and Kubernetes
# run it). With Docker:
#
#   docker build -t bazaar .
#   docker run --rm -p 8080:8080 bazaar            # bazaar up: the whole system
#
# On machines without Docker or registry access, deploy/image.sh builds the
# same runtime stage with podman from a base made from Debian packages and
# a binary built outside (deploy/Dockerfile.prebuilt).

# The toolchain crates/bazaar/link-order.txt was written with (see
# docs/operations.md, "The binary's memory").
ARG RUST_IMAGE=rust:1.95-bookworm
ARG RUNTIME_IMAGE=debian:bookworm-slim

# --- build: dependencies first, so a source change rebuilds only our crates
FROM ${RUST_IMAGE} AS build
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p bazaar \
 && strip --strip-debug -o /usr/local/bin/bazaar target/release/bazaar

# --- runtime: the binary, a non-root user, nothing else
FROM ${RUNTIME_IMAGE}
ARG VERSION=dev
ARG REVISION=unknown
LABEL org.opencontainers.image.title="bazaar" \
      org.opencontainers.image.description="Bazaar: a commerce backend built as Rust microservices" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}"
RUN useradd --uid 10001 --no-log-init --home-dir /var/lib/bazaar --create-home --shell /usr/sbin/nologin bazaar
COPY --from=build /usr/local/bin/bazaar /usr/local/bin/bazaar
USER 10001
WORKDIR /var/lib/bazaar
# Listen beyond the container's loopback; JSON logs.
ENV BAZAAR_HOST=0.0.0.0 BAZAAR_LOG_FORMAT=json
EXPOSE 8080
# `bazaar probe` asks this process's port (BAZAAR_PORT, else 8080) for /health.
HEALTHCHECK --interval=10s --timeout=4s --start-period=20s --retries=3 CMD ["bazaar", "probe"]
ENTRYPOINT ["bazaar"]
CMD ["up"]
