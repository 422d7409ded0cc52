# tunnel-server: multi-stage build, final stage `scratch` + the binary, its shared libraries and a CA
# bundle (assembled by deploy/images/rootfs.sh, which deploy/images/build.sh also uses to make the
# same image without a registry). Build from the repository root:
#
#   docker build -f deploy/images/tunnel-server.Dockerfile -t tunnel-project/tunnel-server:dev .
#
# build.sh replays this file's final-stage metadata lines (USER, WORKDIR, ENV, ENTRYPOINT, CMD,
# EXPOSE) with `docker import --change`: keep each on one line, and add no other instruction
# to the final stage than the COPY of /rootfs.
ARG RUST_IMAGE=rust:1.95-bookworm

FROM ${RUST_IMAGE} AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY .cargo .cargo
COPY tunnel-proto tunnel-proto
COPY agent-core agent-core
COPY agent-cluster agent-cluster
COPY agent-node agent-node
COPY server-side server-side
COPY deploy/templates deploy/templates
COPY deploy/images/rootfs.sh deploy/images/rootfs.sh
RUN cargo build --release --locked -p server-side --bin tunnel-server \
 && deploy/images/rootfs.sh tunnel-server target/release/tunnel-server /rootfs

FROM scratch
COPY --from=build /rootfs/ /
USER 65532:65532
WORKDIR /
ENV SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt TUNNEL_SERVER_DATA_DIR=/var/lib/tunnel-server
ENTRYPOINT ["/usr/local/bin/tunnel-server"]
CMD ["serve"]
