//! The `rumqttc` client (MQTT 3.1.1 and 5.0) against the tenant VM and the
//! host-native runner: QoS 1 delivery in order, retained messages, and MQTT 5
//! user properties and content type passed through.

mod common;

use std::sync::mpsc;
use std::thread;
use std::time::Duration;

use common::{RunningVm, kvm_available};

const WAIT: Duration = Duration::from_secs(15);

/// A 3.1.1 client whose event loop runs on a thread; publishes arrive on the channel.
fn client_v3(target: &RunningVm, id: &str) -> (rumqttc::Client, mpsc::Receiver<rumqttc::Publish>) {
    let mut options = rumqttc::MqttOptions::new(id, target.addr.ip().to_string(), target.addr.port());
    options.set_keep_alive(Duration::from_secs(30));
    let (client, mut connection) = rumqttc::Client::new(options, 100);
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        for event in connection.iter() {
            match event {
                Ok(rumqttc::Event::Incoming(rumqttc::Packet::Publish(p))) => {
                    if tx.send(p).is_err() {
                        return;
                    }
                }
                Ok(_) => {}
                Err(_) => return,
            }
        }
    });
    (client, rx)
}

fn client_v5(
    target: &RunningVm,
    id: &str,
) -> (rumqttc::v5::Client, mpsc::Receiver<rumqttc::v5::mqttbytes::v5::Publish>) {
    let mut options = rumqttc::v5::MqttOptions::new(id, target.addr.ip().to_string(), target.addr.port());
    options.set_keep_alive(Duration::from_secs(30));
    let (client, mut connection) = rumqttc::v5::Client::new(options, 100);
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        for event in connection.iter() {
            match event {
                Ok(rumqttc::v5::Event::Incoming(rumqttc::v5::mqttbytes::v5::Packet::Publish(p))) => {
                    if tx.send(p).is_err() {
                        return;
                    }
                }
                Ok(_) => {}
                Err(_) => return,
            }
        }
    });
    (client, rx)
}

fn v311_qos1_in_order_and_retained(target: &RunningVm) {
    let (sub, inbox) = client_v3(target, "rumq-sub");
    sub.subscribe("rumq/+", rumqttc::QoS::AtLeastOnce).unwrap();
    thread::sleep(Duration::from_millis(300));
    let (publisher, _) = client_v3(target, "rumq-pub");
    for i in 0..50u32 {
        publisher.publish("rumq/seq", rumqttc::QoS::AtLeastOnce, false, i.to_be_bytes().to_vec()).unwrap();
    }
    for i in 0..50u32 {
        let p = inbox.recv_timeout(WAIT).expect("a message");
        assert_eq!(&p.payload[..], &i.to_be_bytes(), "message {i} out of order or missing");
        assert_eq!(p.qos, rumqttc::QoS::AtLeastOnce);
    }
    publisher.publish("rumq/kept", rumqttc::QoS::AtLeastOnce, true, b"kept".to_vec()).unwrap();
    thread::sleep(Duration::from_millis(300));
    let (late, late_inbox) = client_v3(target, "rumq-late");
    late.subscribe("rumq/kept", rumqttc::QoS::AtMostOnce).unwrap();
    let p = late_inbox.recv_timeout(WAIT).expect("the retained message");
    assert!(p.retain);
    assert_eq!(&p.payload[..], b"kept");
}

fn v5_properties_pass_through(target: &RunningVm) {
    use rumqttc::v5::mqttbytes::QoS;
    use rumqttc::v5::mqttbytes::v5::PublishProperties;
    let (sub, inbox) = client_v5(target, "rumq5-sub");
    sub.subscribe("rumq5/t", QoS::ExactlyOnce).unwrap();
    thread::sleep(Duration::from_millis(300));
    let (publisher, _) = client_v5(target, "rumq5-pub");
    let properties = PublishProperties {
        content_type: Some("text/plain".into()),
        user_properties: vec![("tenant".into(), "a".into())],
        response_topic: Some("rumq5/reply".into()),
        ..PublishProperties::default()
    };
    publisher.publish_with_properties("rumq5/t", QoS::ExactlyOnce, false, b"hello".to_vec(), properties).unwrap();
    let p = inbox.recv_timeout(WAIT).expect("a message");
    assert_eq!(&p.payload[..], b"hello");
    assert_eq!(p.qos, QoS::ExactlyOnce);
    let props = p.properties.expect("properties");
    assert_eq!(props.content_type.as_deref(), Some("text/plain"));
    assert_eq!(props.response_topic.as_deref(), Some("rumq5/reply"));
    assert_eq!(props.user_properties, vec![("tenant".to_string(), "a".to_string())]);
}

#[test]
fn vm_rumqttc_v311() {
    if !kvm_available("vm_rumqttc_v311") {
        return;
    }
    v311_qos1_in_order_and_retained(&RunningVm::start(&["--service", "mqtt", "--timeout", "300"]));
}

#[test]
fn vm_rumqttc_v5() {
    if !kvm_available("vm_rumqttc_v5") {
        return;
    }
    v5_properties_pass_through(&RunningVm::start(&["--service", "mqtt", "--timeout", "300"]));
}

#[test]
fn host_runner_rumqttc_v311() {
    v311_qos1_in_order_and_retained(&RunningVm::start_host_broker());
}

#[test]
fn host_runner_rumqttc_v5() {
    v5_properties_pass_through(&RunningVm::start_host_broker());
}
