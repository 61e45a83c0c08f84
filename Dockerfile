# CPU image with evomerge installed; `docker run IMAGE merge recipe.yaml /out`.
FROM python:3.11-slim
ENV PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
WORKDIR /opt/evomerge
# The CPU build of torch first, from PyTorch's CPU index, so the pinned torch==2.13.0 is not
# resolved to a multi-GB CUDA build.
RUN pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu
COPY pyproject.toml README.md ./
COPY evomerge ./evomerge
RUN pip install . && evomerge --help >/dev/null
WORKDIR /work
ENTRYPOINT ["evomerge"]
CMD ["--help"]
