#!/bin/sh
# Generate the gRPC stubs (kmeans_pb2.py, kmeans_pb2_grpc.py) from kmeans.proto.
# They are build output: never edit or commit them.
set -eu
cd "$(dirname "$0")"
python="${PYTHON:-python3}"
"$python" -m grpc_tools.protoc -I. --python_out=. --grpc_python_out=. kmeans.proto
