# One image for every mlmesh Python process; the compose file picks the command per service.
FROM python:3.11-slim-bookworm

ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /app

# Dependencies first, so the layer is reused until the pins change.
COPY constraints.txt ./
RUN pip install -r constraints.txt

COPY pyproject.toml README.md buf.yaml ./
COPY protos protos
COPY third_party third_party
COPY clients clients
COPY services services
COPY gateway gateway
COPY scripts scripts
RUN pip install --no-deps -e ./clients/python -e . \
    && useradd --create-home --uid 10001 mlmesh \
    && mkdir -p /var/lib/mlmesh && chown mlmesh /var/lib/mlmesh
USER mlmesh

CMD ["python", "-m", "services.registry"]
