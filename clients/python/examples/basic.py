#!/usr/bin/env python3
"""Store a prompt's KV blocks in radixkv, look the prompt up, load the
blocks back and compare; through shared memory too when the server allows.

    radixkv-server --listen 127.0.0.1:50051 &          # no tenants: no token
    .venv/bin/python clients/python/examples/basic.py 127.0.0.1:50051
    .venv/bin/python clients/python/examples/basic.py unix:/path/radixkv.sock --token alice-token
"""

import argparse
import random
import sys

from radixkv import Client, RadixKvError, page_hashes


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("target", nargs="?", default="127.0.0.1:50051", help="host:port or unix:/path")
    ap.add_argument("--token", help="the tenant's bearer token")
    ap.add_argument("--model", default="example-model")
    ap.add_argument("--pages", type=int, default=4)
    args = ap.parse_args()

    with Client(args.target, token=args.token, model=args.model) as client:
        info = client.info()
        print(f"server: pages of {info.page_size} tokens, blocks of {info.block_bytes} bytes, "
              f"layout {info.layout!r}, tenant {info.tenant!r}")

        # A prompt of whole pages plus a partial tail (never cached), and
        # stand-in KV: one block per page (an engine would copy its KV here).
        rng = random.Random(42)
        tokens = [rng.randrange(32_000) for _ in range(args.pages * info.page_size + 5)]
        kv = [rng.randbytes(info.block_bytes) for _ in range(args.pages)]

        # Only the pages the cache misses need storing.
        hit = client.lookup(tokens)
        stored = client.store(tokens, kv[hit.pages:], first_page=hit.pages)
        print(f"store: {stored.cached_pages} pages cached already, {stored.stored_pages} stored")

        # The prefix hit, leased so it stays readable while we load it.
        hit = client.lookup(tokens, lease_ms=10_000)
        print(f"lookup: {hit.pages} pages ({hit.tokens} tokens) hit: "
              f"{hit.device_pages} device, {hit.host_pages} host, {hit.disk_pages} disk")
        # The client can name pages itself: the same hashes the server uses.
        assert hit.hashes == page_hashes(info.namespace_seed, tokens, info.page_size)
        try:
            blocks = client.load(hit.lease_id)
            if [b.data for b in blocks] != kv:
                print("loaded blocks DIFFER", file=sys.stderr)
                return 1
            print(f"load: {len(blocks)} loaded blocks match")
            if info.shm_path:
                # Zero-copy: views straight into the server's host tier.
                views = client.load_shm_views(hit.lease_id)
                same = all(v == k for v, k in zip(views, kv)) and len(views) == len(kv)
                print(f"load_shm: {len(views)} blocks in place from {info.shm_path}: "
                      f"{'match' if same else 'DIFFER'}")
                for v in views:
                    v.release()
                if not same:
                    return 1
        finally:
            client.release(hit.lease_id)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except RadixKvError as e:
        print(f"radixkv: {e}", file=sys.stderr)
        sys.exit(2)
