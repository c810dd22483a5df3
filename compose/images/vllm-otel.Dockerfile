# The forecaster and the mitigation receiver (no vLLM inside).
FROM python:3.12.7-slim
COPY pyproject.toml README.md /src/
COPY vllm_otel /src/vllm_otel
RUN python -m pip install --no-cache-dir /src && useradd --uid 10001 vllm-otel
USER 10001
