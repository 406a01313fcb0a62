#!/usr/bin/env python3
"""The knowledge base from Python (grpcio): create a collection, upsert FAQ entries, search.

    pip install grpcio grpcio-tools
    python3 examples/python/kb_client.py localhost:50051 "does this cream suit sensitive skin?"

Generates the concierge.v1 stubs from proto/ into a temporary folder, creates the collection
"faq-demo" if it is not there, upserts three entries (acknowledged once durable), then searches
each question given on the command line and prints the hits, best first.
"""
import sys

import grpc

from client import load_stubs

FAQ = [
    ("sensitive", "Is this face cream suitable for sensitive skin? Yes: fragrance-free and dermatologist tested.", "product"),
    ("popup", "How do I close the popup in the app? Tap the X in its top right corner.", "app"),
    ("returns", "How do I return an item? Unused items can be sent back within 30 days.", "orders"),
]


def main():
    if len(sys.argv) < 3:
        raise SystemExit(__doc__)
    pb, rpc = load_stubs("knowledge_base")
    with grpc.insecure_channel(sys.argv[1]) as channel:
        kb = rpc.KnowledgeBaseStub(channel)
        try:
            kb.CreateCollection(pb.CreateCollectionRequest(name="faq-demo"), timeout=5.0)
        except grpc.RpcError as e:
            if e.code() != grpc.StatusCode.ALREADY_EXISTS:
                raise
        docs = [pb.Document(id=i, text=t, metadata={"topic": topic}) for i, t, topic in FAQ]
        up = kb.Upsert(pb.UpsertRequest(collection="faq-demo", documents=docs), timeout=10.0)
        print(f"upserted: {up.inserted} new, {up.updated} replaced (embedded by {up.model.id}@{up.model.version})")
        for question in sys.argv[2:]:
            try:
                resp = kb.Search(pb.SearchRequest(collection="faq-demo", query=question, top_k=3), timeout=2.0)
            except grpc.RpcError as e:
                print(f"{question!r}: {e.code().name}: {e.details()}")
                continue
            print(question)
            for h in resp.hits:
                print(f"  {h.score:.3f}  {h.id:10s} [{h.metadata.get('topic', '')}] {h.text}")


if __name__ == "__main__":
    main()
