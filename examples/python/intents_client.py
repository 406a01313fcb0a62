#!/usr/bin/env python3
"""Classify customers' messages into intents from Python (grpcio).

    pip install grpcio grpcio-tools
    python3 examples/python/intents_client.py localhost:50051 "set an alarm for 6 am" "asdf qwerty"
    python3 examples/python/intents_client.py localhost:50051 --top-k 3 --threshold 0.9 "what's my balance"
    python3 examples/python/intents_client.py localhost:50051 --image photo.jpg "is this broken?"

Calls Intents.Classify with a deadline and prints each message's best intents with their
probabilities and whether to hand the conversation to a human. --image files (repeatable) are
sent with the first message; only an intent model with a fusion block accepts them.
"""
import argparse

import grpc

from client import load_stubs


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("address")
    parser.add_argument("texts", nargs="+")
    parser.add_argument("--top-k", type=int, default=0, help="intents per message (0: the server's default, 5)")
    parser.add_argument("--threshold", type=float, help="handoff threshold in [0, 1] (default: the model's)")
    parser.add_argument("--image", action="append", default=[], help="an image file sent with the first message")
    args = parser.parse_args()

    pb, rpc = load_stubs("intents")
    images = [open(p, "rb").read() for p in args.image]
    queries = [pb.Query(text=t, images=images if i == 0 else []) for i, t in enumerate(args.texts)]
    request = pb.ClassifyRequest(queries=queries, top_k=args.top_k, truncate=True)
    if args.threshold is not None:
        request.handoff_threshold = args.threshold
    with grpc.insecure_channel(args.address, options=[("grpc.max_send_message_length", 64 << 20)]) as channel:
        stub = rpc.IntentsStub(channel)
        try:
            resp = stub.Classify(request, timeout=5.0)
        except grpc.RpcError as e:
            raise SystemExit(f"{e.code().name}: {e.details()}")
        print(f"model {resp.model.id} @ {resp.model.version}, handoff threshold {resp.handoff_threshold:.3f}")
        for text, result in zip(args.texts, resp.results):
            print(f"{text!r}{'  -> HAND OFF to a human' if result.handoff else ''}")
            for s in result.intents:
                print(f"  {s.label:<32} {s.score:.4f}")


if __name__ == "__main__":
    main()
