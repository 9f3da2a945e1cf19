#!/usr/bin/env python3
"""MQTT behaviour checks with the paho-mqtt client (PyPI), run by tests/mqtt.rs.

Usage: paho_suite.py HOST PORT
Runs every check against the broker at HOST:PORT, prints one line per check,
and exits non-zero if any failed.
"""

import socket
import sys
import threading
import time
import uuid

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

HOST, PORT = sys.argv[1], int(sys.argv[2])
TIMEOUT = 10


class Client:
    """A paho client with a message inbox and blocking helpers."""

    def __init__(self, version, client_id=None, clean=True, will=None, props=None):
        client_id = client_id or "paho-" + uuid.uuid4().hex[:8]
        kwargs = {"client_id": client_id, "protocol": version}
        if version != mqtt.MQTTv5:
            kwargs["clean_session"] = clean
        self.c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, **kwargs)
        self.version = version
        self.inbox = []
        self.cond = threading.Condition()
        self.connack = None
        self.c.on_message = self._on_message
        self.c.on_connect = self._on_connect
        if will:
            self.c.will_set(*will)
        if version == mqtt.MQTTv5:
            self.c.connect(HOST, PORT, keepalive=30, clean_start=clean, properties=props)
        else:
            self.c.connect(HOST, PORT, keepalive=30)
        self.c.loop_start()
        self.wait(lambda: self.connack is not None, "CONNACK")

    def _on_connect(self, client, userdata, flags, reason_code, properties):
        with self.cond:
            self.connack = (flags.session_present, reason_code)
            self.cond.notify_all()

    def _on_message(self, client, userdata, msg):
        with self.cond:
            self.inbox.append(msg)
            self.cond.notify_all()

    def wait(self, predicate, what):
        with self.cond:
            if not self.cond.wait_for(predicate, TIMEOUT):
                raise AssertionError("timed out waiting for " + what)

    def messages(self, n):
        self.wait(lambda: len(self.inbox) >= n, f"{n} messages")
        time.sleep(0.1)
        return list(self.inbox)

    def subscribe(self, topic, qos=0, **kw):
        result, mid = self.c.subscribe(topic, qos, **kw) if kw else self.c.subscribe(topic, qos)
        assert result == mqtt.MQTT_ERR_SUCCESS
        time.sleep(0.2)

    def publish(self, topic, payload, qos=0, retain=False, properties=None):
        info = self.c.publish(topic, payload, qos, retain, properties)
        info.wait_for_publish(TIMEOUT)

    def close(self, graceful=True):
        if graceful:
            self.c.disconnect()
        else:
            # Drop the TCP connection without DISCONNECT: the will must fire.
            self.c.socket().shutdown(socket.SHUT_RDWR)
        self.c.loop_stop()


def check_qos_levels(version):
    sub = Client(version)
    sub.subscribe("paho/qos/#", 2)
    pub = Client(version)
    for qos in (0, 1, 2):
        pub.publish(f"paho/qos/{qos}", f"m{qos}".encode(), qos)
    got = sorted((m.topic, m.payload, m.qos) for m in sub.messages(3))
    assert got == [("paho/qos/0", b"m0", 0), ("paho/qos/1", b"m1", 1), ("paho/qos/2", b"m2", 2)], got
    sub.close(); pub.close()


def check_retained(version):
    topic = "paho/retained/" + uuid.uuid4().hex[:6]
    pub = Client(version)
    pub.publish(topic, b"first", 1, retain=True)
    pub.publish(topic, b"second", 1, retain=True)
    late = Client(version)
    late.subscribe(topic, 1)
    msgs = late.messages(1)
    assert [(m.payload, m.retain) for m in msgs] == [(b"second", True)], msgs
    pub.publish(topic, b"", 1, retain=True)
    later = Client(version)
    later.subscribe(topic, 1)
    time.sleep(0.3)
    assert later.inbox == [], "deleted retained message came back"
    for c in (pub, late, later):
        c.close()


def check_persistent_session(version):
    cid = "paho-durable-" + uuid.uuid4().hex[:6]
    topic = "paho/durable/" + cid
    if version == mqtt.MQTTv5:
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = 60
        first = Client(version, cid, clean=True, props=props)
    else:
        first = Client(version, cid, clean=False)
    first.subscribe(topic, 1)
    first.close()
    pub = Client(version)
    pub.publish(topic, b"while away", 1)
    if version == mqtt.MQTTv5:
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = 60
        again = Client(version, cid, clean=False, props=props)
    else:
        again = Client(version, cid, clean=False)
    assert again.connack[0], "session not present"
    msgs = again.messages(1)
    assert [m.payload for m in msgs] == [b"while away"], msgs
    again.close(); pub.close()


def check_will(version):
    topic = "paho/will/" + uuid.uuid4().hex[:6]
    watcher = Client(version)
    watcher.subscribe(topic, 1)
    mortal = Client(version, will=(topic, b"gone", 1, False))
    mortal.close(graceful=False)
    msgs = watcher.messages(1)
    assert [m.payload for m in msgs] == [b"gone"], msgs
    graceful = Client(version, will=(topic, b"should not", 1, False))
    graceful.close(graceful=True)
    time.sleep(0.3)
    assert len(watcher.inbox) == 1, "will sent after a clean DISCONNECT"
    watcher.close()


def check_v5_properties():
    v5 = mqtt.MQTTv5
    sub = Client(v5)
    props = Properties(PacketTypes.SUBSCRIBE)
    props.SubscriptionIdentifier = 77
    sub.c.subscribe("paho/props", options=SubscribeOptions(qos=1), properties=props)
    time.sleep(0.2)
    pub = Client(v5)
    p = Properties(PacketTypes.PUBLISH)
    p.ContentType = "application/json"
    p.ResponseTopic = "paho/reply"
    p.CorrelationData = b"\x01\x02"
    p.PayloadFormatIndicator = 1
    p.UserProperty = [("tenant", "t1"), ("trace", "abc")]
    p.MessageExpiryInterval = 60
    pub.publish("paho/props", b"{}", 1, properties=p)
    m = sub.messages(1)[0]
    q = m.properties
    assert q.ContentType == "application/json", q
    assert q.ResponseTopic == "paho/reply", q
    assert q.CorrelationData == b"\x01\x02", q
    assert q.PayloadFormatIndicator == 1, q
    assert ("tenant", "t1") in q.UserProperty and ("trace", "abc") in q.UserProperty, q
    assert 77 in (q.SubscriptionIdentifier if isinstance(q.SubscriptionIdentifier, list) else [q.SubscriptionIdentifier]), q
    assert 0 < q.MessageExpiryInterval <= 60, q
    sub.close(); pub.close()


def check_v5_no_local_and_shared():
    v5 = mqtt.MQTTv5
    me = Client(v5)
    me.c.subscribe("paho/nolocal", options=SubscribeOptions(qos=0, noLocal=True))
    time.sleep(0.2)
    me.publish("paho/nolocal", b"echo?", 0)
    time.sleep(0.3)
    assert me.inbox == [], "no-local subscription got its own message"
    workers = [Client(v5) for _ in range(2)]
    for w in workers:
        w.subscribe("$share/grp/paho/jobs", 1)
    pub = Client(v5)
    for i in range(10):
        pub.publish("paho/jobs", str(i).encode(), 1)
    time.sleep(0.5)
    counts = [len(w.inbox) for w in workers]
    assert sum(counts) == 10 and min(counts) > 0, counts
    for c in [me, pub] + workers:
        c.close()


CHECKS = [
    ("qos levels 3.1.1", lambda: check_qos_levels(mqtt.MQTTv311)),
    ("qos levels 5.0", lambda: check_qos_levels(mqtt.MQTTv5)),
    ("qos levels 3.1", lambda: check_qos_levels(mqtt.MQTTv31)),
    ("retained 3.1.1", lambda: check_retained(mqtt.MQTTv311)),
    ("retained 5.0", lambda: check_retained(mqtt.MQTTv5)),
    ("persistent session 3.1.1", lambda: check_persistent_session(mqtt.MQTTv311)),
    ("persistent session 5.0", lambda: check_persistent_session(mqtt.MQTTv5)),
    ("will 3.1.1", lambda: check_will(mqtt.MQTTv311)),
    ("will 5.0", lambda: check_will(mqtt.MQTTv5)),
    ("5.0 message properties and subscription id", check_v5_properties),
    ("5.0 no local and shared subscriptions", check_v5_no_local_and_shared),
]

failed = 0
for name, check in CHECKS:
    try:
        check()
        print(f"ok   {name}")
    except Exception as e:  # report every failure, then exit non-zero
        failed += 1
        print(f"FAIL {name}: {type(e).__name__}: {e}")
sys.exit(1 if failed else 0)
