# detr serve in a container:
#   docker build -t detr .
#   docker run -p 8000:8000 -v $PWD/runs/tiny:/runs/tiny -v $PWD/keys:/keys detr \
#       /runs/tiny --host 0.0.0.0 --api-key-file /keys
# The container listens on all its interfaces, so it asks for API keys (or --insecure-public).
# On a CPU host, add --processes N (one per core the container gets) for the most throughput.
FROM python:3.11-slim
WORKDIR /opt/detr
COPY pyproject.toml README.md ./
COPY detr ./detr
# torch is pinned and installed first, on its own, so nothing pulls another build. From PyPI this is
# the CUDA build (several GB); for a small CPU-only image point pip at PyTorch's CPU wheel index here.
RUN pip install --no-cache-dir "torch==2.13.0" \
 && pip install --no-cache-dir "torch==2.13.0" ".[serve]"
EXPOSE 8000
ENTRYPOINT ["detr", "serve", "--port", "8000"]
