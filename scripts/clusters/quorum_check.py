"""A quorum queue keeps accepting publishes with one of three nodes stopped.

Run by `scripts/clusters.sh check-quorum` (pika in target/clusters/venv):
    quorum_check.py PORT_OF_C1 PORT_OF_C2 "STOP C1 COMMAND" "START C1 COMMAND"
Declares a quorum queue through c1 (its leader lands there), publishes with
confirms, stops c1, publishes with confirms through c2, then counts what the
queue holds: every confirmed message must be there once. c1 is started again.
"""

import subprocess
import sys
import time
import uuid

import pika

BATCH = 200


def channel(port):
    params = pika.ConnectionParameters(
        host="127.0.0.1", port=port, credentials=pika.PlainCredentials("guest", "guest"),
        connection_attempts=10, retry_delay=1,
    )
    conn = pika.BlockingConnection(params)
    ch = conn.channel()
    ch.confirm_delivery()
    return conn, ch


def publish(ch, queue, tag):
    """Publishes BATCH persistent messages; pika raises if any is nacked or unroutable."""
    for i in range(BATCH):
        ch.basic_publish("", queue, f"{tag}-{i}".encode(), pika.BasicProperties(delivery_mode=2), mandatory=True)


def main():
    port1, port2, stop_cmd, start_cmd = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
    queue = f"clusters-check-qq-{uuid.uuid4().hex[:8]}"
    conn, ch = channel(port1)
    ch.queue_declare(queue, durable=True, arguments={"x-queue-type": "quorum"})
    publish(ch, queue, "before")
    conn.close()
    print(f"quorum queue {queue}: {BATCH} confirmed through c1 (its leader)")
    stopped = time.monotonic()
    subprocess.run(stop_cmd, shell=True, check=True)
    try:
        conn, ch = channel(port2)
        t = time.monotonic()
        publish(ch, queue, "during")
        print(f"c1 stopped: {BATCH} confirmed through c2 in {time.monotonic() - t:.1f}s "
              f"({time.monotonic() - stopped:.1f}s after the stop began)")
        seen, got = set(), 0
        while True:
            method, _props, body = ch.basic_get(queue, auto_ack=True)
            if method is None:
                break
            seen.add(body)
            got += 1
        ch.queue_delete(queue)
        conn.close()
    finally:
        subprocess.run(start_cmd, shell=True, check=True)
    want = {f"{tag}-{i}".encode() for tag in ("before", "during") for i in range(BATCH)}
    ok = seen == want and got == len(want)
    print(f"accepted = {len(want)}, stored = {got} ({len(seen)} distinct), missing = {len(want - seen)}: {'OK' if ok else 'FAILED'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
