# syntax=docker/dockerfile:1
# One image with both binaries, `gateway` and `worker` (run / migrate).
# docker-compose.yml picks the command per service.

ARG RUST_VERSION=1.95

# ---- builder -----------------------------------------------------------------
FROM rust:${RUST_VERSION}-bookworm AS builder
WORKDIR /app

# Dependencies first, against stub crates: this layer is rebuilt only when a
# manifest or Cargo.lock changes, not on every source edit.
COPY Cargo.toml Cargo.lock ./
COPY common/Cargo.toml common/
COPY gateway/Cargo.toml gateway/
COPY worker/Cargo.toml worker/
COPY bench/Cargo.toml bench/
COPY testkit/Cargo.toml testkit/
COPY e2e/Cargo.toml e2e/
RUN mkdir -p common/src gateway/src worker/src bench/src testkit/src e2e/tests/api \
 && touch common/src/lib.rs gateway/src/lib.rs worker/src/lib.rs testkit/src/lib.rs \
 && echo 'fn main() {}' > gateway/src/main.rs \
 && echo 'fn main() {}' > worker/src/main.rs \
 && echo 'fn main() {}' > bench/src/main.rs \
 && echo 'fn main() {}' > e2e/tests/api/main.rs \
 && echo 'fn main() {}' > e2e/tests/faults.rs \
 && cargo build --release --locked -p gateway -p worker --bins \
 && rm -rf common gateway worker bench testkit e2e

# The real sources (migrations/ too: `sqlx::migrate!` embeds them at compile time).
COPY . .
# COPY keeps the context's mtimes, which may be older than the stub build:
# touch the crate roots so cargo rebuilds our crates (and only them).
RUN touch common/src/lib.rs gateway/src/lib.rs gateway/src/main.rs worker/src/lib.rs worker/src/main.rs \
 && cargo build --release --locked -p gateway -p worker --bins \
 && mkdir -p /out config \
 && cp target/release/gateway target/release/worker /out/

# ---- runtime -----------------------------------------------------------------
FROM debian:bookworm-slim AS runtime
# ca-certificates: TLS to JWKS (Clerk), amqps, rediss. curl: the healthchecks.
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates curl \
 && rm -rf /var/lib/apt/lists/*
RUN useradd --system --uid 10001 --user-group --no-create-home --shell /usr/sbin/nologin app

# Settings::load reads ./config/{default,$APP_ENV}.toml when present.
WORKDIR /app
COPY --from=builder /app/config /app/config
COPY --from=builder /out/gateway /out/worker /usr/local/bin/

USER app
ENV GATEWAY_LISTEN=0.0.0.0:8080 \
    WORKER_LISTEN=0.0.0.0:9090
EXPOSE 8080 9090
CMD ["gateway"]
