# One image for both roles: `outbox-operator operator` (the controller) and
# `outbox-operator relay` (the worker pods it runs).
#
# Build:  docker build -t outbox-operator:dev .
# The build compiles the bundled librdkafka (cmake) so the image does not depend
# on whatever librdkafka a base image ships.

FROM rust:1.95-bookworm AS build
RUN apt-get update \
 && apt-get install -y --no-install-recommends cmake pkg-config libssl-dev libcurl4-openssl-dev zlib1g-dev \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
# The test bed crate is a workspace member but only a dev-dependency; build just the binary.
RUN cargo build --release --locked --bin outbox-operator \
 && strip target/release/outbox-operator

FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates libssl3 libcurl4 zlib1g \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /src/target/release/outbox-operator /usr/local/bin/outbox-operator
# Numeric non-root user so `runAsNonRoot` can verify it without /etc/passwd lookups.
USER 65532:65532
EXPOSE 8080
ENTRYPOINT ["/usr/local/bin/outbox-operator"]
CMD ["operator"]
