# vLLM with the vllm-otel plugins installed (the BASE image decides GPU or CPU).
ARG BASE=vllm/vllm-openai:v0.11.0
FROM ${BASE}
COPY pyproject.toml README.md /src/
COPY vllm_otel /src/vllm_otel
# vLLM is already in the base image: install vllm-otel without its vllm extra.
RUN python3 -m pip install --no-cache-dir /src
