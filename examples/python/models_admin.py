#!/usr/bin/env python3
"""Swap checkpoints on a running concierge server (the Models admin API) from Python (grpcio).

    pip install grpcio grpcio-tools
    export CONCIERGE_ADMIN_TOKEN=...          # the token the server was started with
    python3 examples/python/models_admin.py localhost:50051 list
    python3 examples/python/models_admin.py localhost:50051 load intent /models/intents-2026-11-30 intents-2026-11-30
    python3 examples/python/models_admin.py localhost:50051 load text-encoder hub:sentence-transformers/all-MiniLM-L6-v2@main minilm-hub
    python3 examples/python/models_admin.py localhost:50051 promote intent 10     # canary: 10% of callers
    python3 examples/python/models_admin.py localhost:50051 promote intent 100    # make it active
    python3 examples/python/models_admin.py localhost:50051 rollback intent       # the previous version, at once

Every call bears `authorization: Bearer $CONCIERGE_ADMIN_TOKEN`. Prints the slots the call
changed (or all of them for `list`): each version's label, state, traffic share and source.
"""
import argparse
import os

import grpc

from client import load_stubs


def show(slots, pb):
    for slot in slots:
        print(slot.name)
        for v in slot.versions:
            state = pb.VersionState.Name(v.state).removeprefix("VERSION_STATE_").lower()
            share = f"{v.traffic_percent:5.1f}%" if state in ("active", "candidate") else "      "
            print(f"  {state:<9} {share} {v.version:<28} {v.source}{'  ' + v.error if v.error else ''}")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("address")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list")
    load = sub.add_parser("load")
    load.add_argument("slot")
    load.add_argument("source", help="a folder on the server, or hub:<repo>@<revision>")
    load.add_argument("version", help="a label for the new version, unique in the slot")
    promote = sub.add_parser("promote")
    promote.add_argument("slot")
    promote.add_argument("percent", type=float)
    rollback = sub.add_parser("rollback")
    rollback.add_argument("slot")
    args = parser.parse_args()

    token = os.environ.get("CONCIERGE_ADMIN_TOKEN")
    if not token:
        raise SystemExit("set CONCIERGE_ADMIN_TOKEN to the server's admin token")
    metadata = [("authorization", f"Bearer {token}")]
    pb, rpc = load_stubs("models")
    with grpc.insecure_channel(args.address) as channel:
        stub = rpc.ModelsStub(channel)
        try:
            if args.command == "list":
                show(stub.List(pb.ListModelsRequest(), metadata=metadata, timeout=5.0).slots, pb)
            elif args.command == "load":
                if args.source.startswith("hub:"):
                    repo, _, revision = args.source[4:].partition("@")
                    source = pb.ModelSource(hub=pb.HubSource(repo=repo, revision=revision or "main"))
                else:
                    source = pb.ModelSource(local_dir=args.source)
                resp = stub.Load(pb.LoadModelRequest(slot=args.slot, source=source, version=args.version),
                                 metadata=metadata, timeout=600.0)
                print(f"loaded, checked and warmed in {resp.load_seconds:.1f} s; 0% of the traffic until promoted")
                show([resp.slot], pb)
            elif args.command == "promote":
                resp = stub.Promote(pb.PromoteModelRequest(slot=args.slot, traffic_percent=args.percent),
                                    metadata=metadata, timeout=5.0)
                show(resp.slots, pb)
            else:
                show(stub.Rollback(pb.RollbackModelRequest(slot=args.slot), metadata=metadata, timeout=5.0).slots, pb)
        except grpc.RpcError as e:
            raise SystemExit(f"{e.code().name}: {e.details()}")


if __name__ == "__main__":
    main()
