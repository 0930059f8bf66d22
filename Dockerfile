# syntax=docker/dockerfile:1
# edge-proxy container image: docs/deploy.md. Build: docker build -t edge-proxy .
ARG PYTHON_VERSION=3.12

# -- Stage 1: wheels for the gateway and every pinned dependency (compilers, if any wheel needs one, stay here).
FROM python:${PYTHON_VERSION}-slim AS wheels
ENV PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY constraints.txt pyproject.toml README.md ./
COPY proxy ./proxy
RUN pip wheel --no-cache-dir --wheel-dir /wheels --constraint constraints.txt .

# -- Stage 2: the runtime: slim Python, the installed wheels, no build tools, no pip cache, non-root.
FROM python:${PYTHON_VERSION}-slim AS runtime
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
# uid/gid 10001: the Helm chart's podSecurityContext runs the pod as this user.
RUN groupadd --system --gid 10001 edge-proxy \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
      --shell /usr/sbin/nologin edge-proxy
# Installed from the wheels stage only (--no-index): the image gets exactly the pinned versions.
RUN --mount=type=bind,from=wheels,source=/wheels,target=/wheels \
    pip install --no-cache-dir --no-index --find-links=/wheels /wheels/edge_proxy-*.whl
WORKDIR /etc/edge-proxy
USER 10001:10001
EXPOSE 8080
# Exec form: the gateway is PID 1 and receives SIGTERM itself, so it drains streams before exiting.
ENTRYPOINT ["edge-proxy"]
CMD ["serve", "--config", "/etc/edge-proxy/config.yaml"]
