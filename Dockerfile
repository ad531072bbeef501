# kvqueue: one image for the KV workers and the producer (see docker-compose.yml).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app

# Dependencies first, read from pyproject.toml, so that editing the code reuses this layer.
COPY pyproject.toml ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" > /tmp/requirements.txt \
    && pip install -r /tmp/requirements.txt \
    && rm /tmp/requirements.txt

# Then the project itself: `workers.KVWorker` importable by `rq worker -w`, `producer/send.py`
# runnable from /app.
COPY . .
RUN pip install --no-deps . \
    && useradd --create-home --uid 10001 kvqueue
USER kvqueue

# Every service names its own command; this default just shows the presets.
CMD ["kvqueue", "presets"]
