# One ping-pong client for benches/ws_profile.sh: CONNS connections, each sending N
# 32-byte text messages one at a time and awaiting each echo.
# Usage: ws_pingpong.py URL CONNS N
import asyncio, sys
from websockets.asyncio.client import connect

async def one(url, n):
    async with connect(url, compression=None) as ws:
        msg = "x" * 32
        for _ in range(n):
            await ws.send(msg)
            assert await ws.recv() == msg

async def main(url, conns, n):
    await asyncio.gather(*(one(url, n) for _ in range(conns)))

asyncio.run(main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3])))
