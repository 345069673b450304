# One image for every Switchboard process (web, worker, beat, migrate); compose.yaml picks
# the command. Static files are collected at build time and served by ServeStatic.
# X-Forwarded-* headers are trusted from FORWARDED_ALLOW_IPS only (uvicorn reads it; default
# 127.0.0.1): set it to the proxy's addresses, as compose.yaml does.
FROM python:3.11-slim
ENV PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 SWITCHBOARD_VAR_DIR=/app/var
WORKDIR /app
COPY pyproject.toml README.md ./
COPY portal portal
COPY billing billing
COPY gateway gateway
COPY templates templates
COPY manage.py catalog.example.yaml ./
RUN pip install --no-cache-dir . \
    && python manage.py collectstatic --no-input --verbosity 0 \
    && useradd --system --home /app switchboard \
    && mkdir -p /app/var/settlement-spool /tmp/prometheus \
    && chown -R switchboard /app/var /tmp/prometheus
USER switchboard
EXPOSE 8000
CMD ["sh", "-c", "rm -rf /tmp/prometheus/* && exec uvicorn portal.asgi:application --host 0.0.0.0 --port 8000 --workers \"${WEB_CONCURRENCY:-$(nproc)}\" --proxy-headers --no-access-log"]
