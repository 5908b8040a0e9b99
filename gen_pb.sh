#!/bin/sh
# Generate the gRPC stubs (kmeans_pb2.py, kmeans_pb2_grpc.py) from kmeans.proto.
# They are build output: never edit or commit them.
# The Python used: $PYTHON, else the project's .venv if there is one, else python3.
set -eu
cd "$(dirname "$0")"
if [ -n "${PYTHON:-}" ]; then python="$PYTHON"
elif [ -x .venv/bin/python ]; then python=.venv/bin/python
else python=python3
fi
"$python" -m grpc_tools.protoc -I. --python_out=. --grpc_python_out=. kmeans.proto
