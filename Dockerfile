# One image for every tier (role by configuration) and for the loadgen.
# BASE is python:3.11-slim where a registry answers, else tierlab/base:bookworm (debootstrap, made by
# `make images`). Wheels come from .local/wheelhouse, built on the host: build with --network none.
ARG BASE=python:3.11-slim

FROM ${BASE} AS venv
# the host's own wheels, or another architecture's (`make images ARCH=arm64`: .local/wheelhouse-arm64)
ARG WHEELHOUSE=.local/wheelhouse
COPY ${WHEELHOUSE} /wheelhouse
RUN python3 -m venv /opt/venv \
 && /opt/venv/bin/pip install --no-index --no-cache-dir --find-links /wheelhouse \
      -r /wheelhouse/requirements.txt -c /wheelhouse/constraints.txt

FROM ${BASE}
# tc and ip for link shaping: already in the offline base; python:3.11-slim needs them from apt
RUN if ! command -v tc >/dev/null || ! command -v setcap >/dev/null; then \
      apt-get update && apt-get install -y --no-install-recommends iproute2 libcap2-bin \
      && rm -rf /var/lib/apt/lists/*; fi \
 # the tier runs as a non-root user; only tc may use the NET_ADMIN the container is given
 && setcap cap_net_admin+ep "$(command -v tc)"
COPY --from=venv /opt/venv /opt/venv
COPY services /opt/tierlab/services
COPY loadgen /opt/tierlab/loadgen
COPY compose /opt/tierlab/compose
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONPATH=/opt/tierlab \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    TIERLAB_HOST=0.0.0.0 \
    TIERLAB_PORT=8000
USER 10001:10001
WORKDIR /opt/tierlab
EXPOSE 8000
ENTRYPOINT ["python", "-m"]
CMD ["services", "tier"]
