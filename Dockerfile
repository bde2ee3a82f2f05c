# One image for api and worker. On x86_64 Linux, PyPI's torch==2.13.0 is the CUDA build that GPU
# workers need; the api process never imports torch (it only carries it).
FROM python:3.11-slim
ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 DRIFTSAFE_DATA_DIR=/data DRIFTSAFE_WORLDS_DIR=/data/worlds
WORKDIR /app
COPY pyproject.toml README.md ./
COPY api api
COPY worker worker
COPY trainer trainer
COPY store store
COPY bench bench
COPY cli cli
RUN pip install . && useradd --create-home driftsafe && mkdir -p /data && chown driftsafe /data
USER driftsafe
VOLUME /data
EXPOSE 8000
CMD ["driftsafe", "serve", "api", "--host", "0.0.0.0", "--port", "8000"]
