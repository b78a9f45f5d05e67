# Prometheus from Debian's package, for machines where prom/prometheus cannot be pulled.
# The build context holds prometheus_*.deb (apt-get download prometheus, on the host).
ARG BASE=tierlab/base:bookworm
FROM ${BASE}
COPY prometheus_*.deb /tmp/
RUN dpkg -x /tmp/prometheus_*.deb /tmp/unpacked \
 && cp /tmp/unpacked/usr/bin/prometheus /tmp/unpacked/usr/bin/promtool /usr/local/bin/ \
 && rm -rf /tmp/unpacked /tmp/prometheus_*.deb \
 && mkdir -p /prometheus && chown 65534:65534 /prometheus
USER 65534:65534
WORKDIR /prometheus
EXPOSE 9090
ENTRYPOINT ["/usr/local/bin/prometheus"]
CMD ["--config.file=/etc/prometheus/prometheus.yml", "--storage.tsdb.path=/prometheus"]
