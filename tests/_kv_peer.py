"""A prefill process for tests/test_disagg.py (spawned): joins the decoder and
streams requests with a delay per layer, until killed."""
from __future__ import annotations

import asyncio
import os

for _k in ("FI_TCP_IFACE", "FI_UDP_IFACE", "FI_SOCKETS_IFACE"):
    os.environ[_k] = "lo"

import numpy as np  # noqa: E402

import aiofabric as af  # noqa: E402
from aiofabric.disagg import KVPrefill, RequestAborted  # noqa: E402
from aiofabric.kv import KVLayout  # noqa: E402


def prefill(provider: str, layout: dict, decoder: bytes, delay: float, conn) -> None:
    async def main() -> None:
        lay = KVLayout.from_dict(layout)
        async with af.open_engine(provider) as eng:
            kv = np.frombuffer(np.random.default_rng(7).bytes(lay.nbytes), np.uint8).copy()
            region = eng.register(kv, remote_write=False)
            async with KVPrefill(eng, lay, region, hidden_bytes=64) as pre:
                await pre.join(af.Address.from_bytes(decoder))
                conn.send(eng.address.to_bytes())

                async def serve(req):
                    src = pre.pool.alloc(len(req.dst_blocks))
                    try:
                        for layer in range(lay.layers):
                            await asyncio.sleep(delay)
                            req.send_layer(layer, src)
                        await req.finish(np.full(64, req.id % 256, np.uint8))
                    except (RequestAborted, af.BrokenResourceError):
                        pass
                    finally:
                        pre.pool.free(src)

                while True:
                    req = await pre.next_request()
                    asyncio.ensure_future(serve(req))

    asyncio.run(main())
