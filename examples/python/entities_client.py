#!/usr/bin/env python3
"""Extract entities from Python (grpcio).

    pip install grpcio grpcio-tools
    python3 examples/python/entities_client.py localhost:50051 "show me flights from boston to denver on monday"

Calls Entities.Extract with a deadline and prints each entity's label, text, code point span
and confidence; the span indexes the Python string directly (text[start:end]).
"""
import sys

import grpc

from client import load_stubs


def main():
    if len(sys.argv) < 3:
        raise SystemExit(__doc__)
    pb, rpc = load_stubs("entities")
    texts = sys.argv[2:]
    with grpc.insecure_channel(sys.argv[1]) as channel:
        stub = rpc.EntitiesStub(channel)
        try:
            resp = stub.Extract(pb.ExtractRequest(texts=texts), timeout=5.0)
        except grpc.RpcError as e:
            raise SystemExit(f"{e.code().name}: {e.details()}")
        print(f"model {resp.model.id} @ {resp.model.version}")
        for text, result in zip(texts, resp.results):
            print(repr(text))
            for e in result.entities:
                assert text[e.start:e.end] == e.text
                print(f"  {e.label:<28} {e.text!r:<20} [{e.start}, {e.end})  confidence {e.confidence:.3f}")


if __name__ == "__main__":
    main()
