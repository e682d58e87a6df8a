# syntax=docker/dockerfile:1
#
# The codex-app-gateway image: the Python daemon plus the pinned codex binary it spawns.
#
#   docker build -t codex-app-gateway .
#   docker buildx build --platform linux/amd64,linux/arm64 -t codex-app-gateway .
#
# Stages:
#   codex   - installs the pinned @openai/codex from tools/codex (package-lock.json, npm ci) and
#             lays out its native package for the target architecture in /opt/codex.
#   build   - builds a virtualenv with the gateway, every dependency pinned by constraints.txt.
#   runtime - python slim + bubblewrap + tini + the two above, as a non-root user.

# Must equal the version pinned in tools/codex/package.json (a test checks it; the build
# re-checks it against what npm actually installed).
ARG CODEX_VERSION=0.169.0

# ---------------------------------------------------------------------------------------------
FROM node:22.20.0-bookworm-slim AS codex
ARG CODEX_VERSION
# Set by BuildKit to the platform being built (amd64 or arm64). npm installs the one optional
# @openai/codex-linux-<arch> package that matches the stage's own platform, so this stage runs
# as the target platform (under emulation when cross-building).
ARG TARGETARCH
WORKDIR /src/tools/codex
COPY tools/codex/package.json tools/codex/package-lock.json ./
RUN npm ci --no-audit --no-fund --loglevel=error
# The native binary finds its helpers (codex-resources/, codex-path/, codex-code-mode-host) next
# to itself, so the platform package's layout is kept whole in /opt/codex and the runtime stage
# links /usr/local/bin/codex to /opt/codex/bin/codex.
RUN set -eu; \
    case "${TARGETARCH:-amd64}" in \
      amd64) npm_arch=x64;   triple=x86_64-unknown-linux-musl ;; \
      arm64) npm_arch=arm64; triple=aarch64-unknown-linux-musl ;; \
      *) echo "unsupported TARGETARCH ${TARGETARCH}" >&2; exit 1 ;; \
    esac; \
    installed="$(node -p "require('@openai/codex/package.json').version")"; \
    if [ "$installed" != "$CODEX_VERSION" ]; then \
      echo "tools/codex installs codex $installed but CODEX_VERSION is $CODEX_VERSION" >&2; exit 1; \
    fi; \
    vendor="node_modules/@openai/codex-linux-${npm_arch}/vendor/${triple}"; \
    test -x "$vendor/bin/codex"; \
    mkdir -p /opt/codex; \
    cp -a "$vendor/." /opt/codex/; \
    /opt/codex/bin/codex --version

# ---------------------------------------------------------------------------------------------
FROM python:3.11.14-slim-bookworm AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN python -m venv /opt/venv
WORKDIR /src
# README.m[d]: copied when present (pyproject names it as the long description).
COPY pyproject.toml constraints.txt README.m[d] ./
COPY gateway ./gateway
RUN /opt/venv/bin/pip install -c constraints.txt . \
    && /opt/venv/bin/codex-app-gateway --help >/dev/null

# ---------------------------------------------------------------------------------------------
FROM python:3.11.14-slim-bookworm AS runtime
ARG CODEX_VERSION
LABEL org.opencontainers.image.title="codex-app-gateway" \
      org.opencontainers.image.description="codex app-server per workspace behind a WebSocket gateway" \
      codex-app-gateway.codex-version="${CODEX_VERSION}"

# bubblewrap: codex looks for a system bwrap on PATH (it logs an error and falls back to its
# bundled copy otherwise). ca-certificates: TLS to S3 and the model endpoint. tini: the init
# the daemon runs under (see ENTRYPOINT).
RUN apt-get update \
    && apt-get install -y --no-install-recommends bubblewrap ca-certificates tini \
    && rm -rf /var/lib/apt/lists/*

# A fixed numeric user, so `runAsNonRoot` can verify it without a passwd lookup. Its home and
# the session root live on /var/lib/codex-app-gateway, which the Helm chart mounts as an
# emptyDir (the root filesystem is read-only there).
RUN groupadd --system --gid 10001 gateway \
    && useradd --system --uid 10001 --gid 10001 --home-dir /var/lib/codex-app-gateway \
       --shell /usr/sbin/nologin gateway \
    && install -d -o 10001 -g 10001 -m 0750 /var/lib/codex-app-gateway \
       /var/lib/codex-app-gateway/sessions /var/lib/codex-app-gateway/store

COPY --from=codex /opt/codex /opt/codex
RUN ln -s /opt/codex/bin/codex /usr/local/bin/codex
# codex's requirements (sandbox modes, approval policies), matching the gateway's default
# protocol policy: root-owned and read-only, so no session's child can loosen it.
COPY --chown=0:0 --chmod=0444 tools/codex/requirements.toml /etc/codex/requirements.toml
RUN chmod 0755 /etc/codex
COPY --from=build /opt/venv /opt/venv

ENV PATH="/opt/venv/bin:${PATH}" \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/var/lib/codex-app-gateway \
    CXG_TMP_ROOT=/var/lib/codex-app-gateway/sessions \
    CXG_LOCAL_STORE_DIR=/var/lib/codex-app-gateway/store

USER 10001:10001
WORKDIR /var/lib/codex-app-gateway
EXPOSE 8086

# tini runs the daemon and reaps whatever is orphaned to it; -s registers it as a child
# subreaper when it is not PID 1 (the chart sets shareProcessNamespace, so the pod's pause
# process is PID 1 there), so orphans of the daemon's tree reach tini, not pause. tini forwards
# SIGTERM to the daemon, which drains and saves; when the daemon exits for any reason (a
# SIGKILL too), tini exits with it and the runtime ends what is left of the container. The
# daemon is not made PID 1 itself: PID 1 has no default signal actions and would have to reap
# every orphan of the container, including those of `kubectl exec` sessions that are not ours.
# Each codex child is a subreaper of its own tree (gateway/sessions/child_process.py).
ENTRYPOINT ["/usr/bin/tini", "-s", "--", "codex-app-gateway"]
CMD ["serve"]
