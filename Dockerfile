# Multi-stage build: compile in the Rust image, run as an unprivileged user in a slim image.
FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p pgbastion

FROM debian:bookworm-slim
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --home-dir /nonexistent --shell /usr/sbin/nologin pgbastion
COPY --from=build /src/target/release/pgbastion /usr/local/bin/pgbastion
USER 10001
EXPOSE 6432
ENTRYPOINT ["/usr/local/bin/pgbastion"]
CMD ["serve", "--config", "/etc/pgbastion/pgbastion.toml"]
