#!/usr/bin/env python3
"""One-at-a-time QoS 1 round trip with paho-mqtt, side by side.

One client subscribes to a topic and publishes QoS 1 messages to it, one at
a time: the next publish waits for the previous message to come back. That
is the request/response pattern (commands to devices, RPC over MQTT), where
any write held back by Nagle's algorithm against a delayed ACK shows up as
~40 ms. Targets, in one run: Mosquitto (the anchor), `mqvisor broker` (the
host-native runner) and `mqvisor run` (a tenant VM). Prints p50/p99 in ms
and the ratio of each p50 to Mosquitto's.

Usage: scripts/bench-rtt.py [--messages N] [--mqvisor PATH] [--mosquitto PATH]
"""

import argparse
import os
import socket
import statistics
import subprocess
import sys
import threading
import time

import paho.mqtt.client as mqtt


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_listening(port, proc, timeout=20.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            sys.exit(f"bench-rtt: target exited early with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    sys.exit(f"bench-rtt: nothing listens on port {port}")


def round_trips(port, messages):
    got = threading.Event()
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"rtt-{port}")
    client.on_message = lambda c, u, m: got.set()
    client.connect("127.0.0.1", port)
    client.loop_start()
    subscribed = threading.Event()
    client.on_subscribe = lambda *a: subscribed.set()
    client.subscribe("rtt/echo", qos=1)
    if not subscribed.wait(10):
        sys.exit("bench-rtt: no SUBACK")
    samples = []
    for i in range(messages + 20):
        got.clear()
        start = time.perf_counter()
        client.publish("rtt/echo", b"x" * 32, qos=1)
        if not got.wait(10):
            sys.exit(f"bench-rtt: message {i} did not come back")
        if i >= 20:  # warm-up
            samples.append((time.perf_counter() - start) * 1000)
    client.loop_stop()
    client.disconnect()
    samples.sort()
    return statistics.median(samples), samples[int(len(samples) * 0.99) - 1]


def main():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=500)
    parser.add_argument("--mqvisor", default=os.path.join(root, "target/release/mqvisor"))
    parser.add_argument("--mosquitto", default="/usr/sbin/mosquitto")
    args = parser.parse_args()

    targets = [
        ("mosquitto", lambda p: [args.mosquitto, "-p", str(p)]),
        ("mqvisor host", lambda p: [args.mqvisor, "broker", "--listen", f"127.0.0.1:{p}"]),
        ("mqvisor VM", lambda p: [args.mqvisor, "run", "--listen", f"127.0.0.1:{p}"]),
    ]
    print(f"QoS 1 round trip, one at a time, paho-mqtt {mqtt.__name__}, {args.messages} messages")
    print(f"{'target':<14} {'p50 ms':>8} {'p99 ms':>8} {'p50 vs mosquitto':>18}")
    anchor = None
    for name, command in targets:
        port = free_port()
        proc = subprocess.Popen(command(port), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait_listening(port, proc)
            p50, p99 = round_trips(port, args.messages)
        finally:
            proc.terminate()
            proc.wait()
        anchor = anchor or p50
        print(f"{name:<14} {p50:8.3f} {p99:8.3f} {p50 / anchor:17.2f}x")


if __name__ == "__main__":
    main()
