# One fan-out client for benches/ws_profile.sh: CONNS connections to a broadcasting route;
# the first sends N text messages, message k+1 once every connection has message k-WINDOW,
# and every connection checks that it receives them all, in order.
# Usage: ws_fanout.py URL CONNS N WINDOW
import asyncio, sys
from websockets.asyncio.client import connect

async def main(url, conns, n, window):
    wss = [await connect(url, compression=None, max_queue=None) for _ in range(conns)]
    # Let the server register the last ones before the first broadcast.
    await asyncio.sleep(0.5)
    counts = [0] * n
    complete = [asyncio.Event() for _ in range(n)]

    async def receive(ws):
        for k in range(n):
            got = int(await ws.recv())
            assert got == k, f"got message {got}, want {k}"
            counts[k] += 1
            if counts[k] == conns:
                complete[k].set()

    async def send():
        for k in range(n):
            if k > window:
                await complete[k - window - 1].wait()
            await wss[0].send(f"{k:032d}")

    await asyncio.gather(send(), *(receive(ws) for ws in wss))
    # The server closes the TCP connection after it answers the close: all at once.
    await asyncio.gather(*(ws.close() for ws in wss))

asyncio.run(main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])))
