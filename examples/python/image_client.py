#!/usr/bin/env python3
"""Embed photos and read their moderation scores from Python (grpcio).

    pip install grpcio grpcio-tools
    python3 examples/python/image_client.py localhost:50051 photo.jpg [more.png ...]

Sends the files' bytes as they are (the server decodes them) to Embeddings.EmbedImage with a
deadline, and prints each vector's size and norm with the image's unsafe_score and flag.
"""
import sys

import grpc

from client import load_stubs


def main():
    if len(sys.argv) < 3:
        raise SystemExit(__doc__)
    pb, rpc = load_stubs()
    paths = sys.argv[2:]
    images = [open(p, "rb").read() for p in paths]
    with grpc.insecure_channel(sys.argv[1], options=[("grpc.max_send_message_length", 64 << 20)]) as channel:
        stub = rpc.EmbeddingsStub(channel)
        try:
            resp = stub.EmbedImage(pb.EmbedImageRequest(images=images), timeout=10.0)
        except grpc.RpcError as e:
            raise SystemExit(f"{e.code().name}: {e.details()}")
        print(f"model {resp.model.id} @ {resp.model.version}, dim {resp.dimension}, "
              f"flag threshold {resp.moderation_threshold}")
        for i, (path, emb) in enumerate(zip(paths, resp.embeddings)):
            norm = sum(v * v for v in emb.values) ** 0.5
            line = f"{path}: {len(emb.values)} values, norm {norm:.3f}"
            if resp.moderation:
                m = resp.moderation[i]
                line += f", unsafe_score {m.unsafe_score:.4f}{' FLAGGED' if m.flagged else ''}"
            print(line)


if __name__ == "__main__":
    main()
