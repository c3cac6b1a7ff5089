# One image for both roles: `outbox-operator operator` (the controller) and
# `outbox-operator relay` (the worker pods it runs).
#
# Build:  docker build -t outbox-operator:dev .
# The build compiles the bundled librdkafka (cmake) so the image does not depend
# on whatever librdkafka a base image ships.
#
# Without a registry or network (as the test bed builds it, see hack/image):
#   podman build --pull=never --network=none --target prebuilt \
#     --build-arg RUNTIME_BASE=<a local Debian 12 image> -f Dockerfile <dir with the binary>
# builds the same runtime around a binary compiled outside; stages are ordered
# so that this target never needs the Rust builder image.

ARG RUNTIME_BASE=debian:bookworm-slim

# What the binary links against (OpenSSL, curl, zlib) and CA certificates. A base
# that already has them (the test bed's, made with debootstrap) needs no network.
FROM ${RUNTIME_BASE} AS runtime-base
RUN dpkg-query -W ca-certificates libssl3 libcurl4 zlib1g >/dev/null 2>&1 \
 || (apt-get update \
     && apt-get install -y --no-install-recommends ca-certificates libssl3 libcurl4 zlib1g \
     && rm -rf /var/lib/apt/lists/*)
EXPOSE 8080
ENTRYPOINT ["/usr/local/bin/outbox-operator"]
CMD ["operator"]

# A binary built outside the image (the build context holds `outbox-operator`).
FROM runtime-base AS prebuilt
COPY outbox-operator /usr/local/bin/outbox-operator
# Numeric non-root user so `runAsNonRoot` can verify it without /etc/passwd lookups.
USER 65532:65532

FROM rust:1.95-bookworm AS build
RUN apt-get update \
 && apt-get install -y --no-install-recommends cmake pkg-config libssl-dev libcurl4-openssl-dev zlib1g-dev \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
# The test bed crate is a workspace member but only a dev-dependency; build just the binary.
RUN cargo build --release --locked --bin outbox-operator \
 && strip target/release/outbox-operator

# The default target: the runtime with the binary from the builder stage.
FROM runtime-base
COPY --from=build /src/target/release/outbox-operator /usr/local/bin/outbox-operator
USER 65532:65532
