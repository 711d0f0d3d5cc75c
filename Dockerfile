# tabrec HTTP service: `docker build -t tabrec .` then see docs/service.md for `docker run`.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR=false \
    TABREC_PORT=8000

WORKDIR /src

# CPU-only torch first (from the PyTorch CPU index), so installing the project keeps it and
# never pulls the multi-GB CUDA wheels.
RUN pip install --index-url https://download.pytorch.org/whl/cpu torch==2.13.0

COPY pyproject.toml README.md ./
COPY modeling ./modeling
COPY pipelines ./pipelines
COPY service ./service
RUN pip install . && rm -rf /src

# Unprivileged runtime user; /data is the working directory for a mounted MLflow store or bundles.
RUN useradd --create-home --uid 10001 --shell /usr/sbin/nologin tabrec \
    && mkdir -p /data && chown tabrec:tabrec /data
USER 10001:10001
WORKDIR /data

EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, sys, urllib.request; url = 'http://127.0.0.1:%s/healthz' % os.environ.get('TABREC_PORT', '8000'); sys.exit(0 if urllib.request.urlopen(url, timeout=4).status == 200 else 1)"]

# Models come from --model NAME=URI arguments (docker run ... tabrec --model ...) or TABREC_MODELS.
ENTRYPOINT ["tabrec", "serve", "--host", "0.0.0.0"]
