#!/usr/bin/env python3
"""A minimal concierge client in Python (grpcio).

    pip install grpcio grpcio-tools
    python3 examples/python/client.py localhost:50051 "does this cream suit sensitive skin?" "如何关闭这个弹窗"

Generates the concierge.v1 stubs from proto/ into a temporary folder on first use, then calls
Embeddings.EmbedText with a deadline and prints each vector's size, first values and norm.
"""
import importlib
import os
import sys
import tempfile

import grpc
from grpc_tools import protoc

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PROTO_DIR = os.path.join(ROOT, "proto", "proto")


def load_stubs(service="embeddings"):
    """Generates the stubs of concierge/v1/<service>.proto; returns its (pb2, pb2_grpc) modules."""
    out = tempfile.mkdtemp(prefix="concierge-stubs-")
    files = ["concierge/v1/common.proto", f"concierge/v1/{service}.proto"]
    args = ["protoc", f"-I{PROTO_DIR}", f"--python_out={out}", f"--grpc_python_out={out}"] + files
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    sys.path.insert(0, out)
    return (importlib.import_module(f"concierge.v1.{service}_pb2"),
            importlib.import_module(f"concierge.v1.{service}_pb2_grpc"))


def main():
    if len(sys.argv) < 3:
        raise SystemExit(__doc__)
    pb, rpc = load_stubs()
    with grpc.insecure_channel(sys.argv[1]) as channel:
        stub = rpc.EmbeddingsStub(channel)
        try:
            resp = stub.EmbedText(pb.EmbedTextRequest(inputs=sys.argv[2:], truncate=True), timeout=5.0)
        except grpc.RpcError as e:
            raise SystemExit(f"{e.code().name}: {e.details()}")
        print(f"model {resp.model.id} @ {resp.model.version}, {resp.token_count} tokens, dim {resp.dimension}")
        for text, emb in zip(sys.argv[2:], resp.embeddings):
            norm = sum(v * v for v in emb.values) ** 0.5
            print(f"{text!r}: [{', '.join(f'{v:.4f}' for v in emb.values[:4])}, ...] norm {norm:.3f}")


if __name__ == "__main__":
    main()
