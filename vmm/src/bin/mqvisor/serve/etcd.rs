//! A small etcd v3 client over etcd's JSON gateway (`POST /v3/...`, keys and
//! values base64, 64-bit numbers as JSON strings), on the `hyper` 1 client
//! the daemon already builds.
//!
//! Why not the `etcd-client` crate (measured on a two-core machine): it is
//! gRPC, about 60 crates this workspace does not build otherwise (tonic,
//! prost, h2, tower, axum, ...), 39 s of a clean debug build on its own, and
//! it needs `protoc` (Debian's `protobuf-compiler`) installed to build at
//! all. This client adds no crate (`base64` was already built for the
//! broker), and the few calls the fleet needs (range, put, a
//! create-if-absent transaction, delete, leases) are plain JSON requests.
//! What that gives up: streamed watches and keepalives (each node polls).
//!
//! Owns talking to etcd: one request per connection, each bounded in time
//! ([`REQUEST_TIMEOUT`] per endpoint) and in size ([`MAX_RESPONSE`]), the
//! endpoints tried in turn until one answers. Errors say which endpoint and
//! what went wrong. Never panics on what etcd or the network sends, and
//! never decides anything: what the keys mean is [`super::cluster`]'s.

use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Bytes;
use hyper::{Method, Request};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::net::TcpStream;

/// How long one endpoint has to answer one request.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(1);
/// Largest answer read from etcd (a range over every tenant's table).
pub const MAX_RESPONSE: usize = 16 << 20;

/// What went wrong talking to etcd.
#[derive(Debug, thiserror::Error)]
pub enum EtcdError {
    #[error("etcd {endpoint}: {message}")]
    Transport { endpoint: String, message: String },
    #[error("etcd {endpoint}: {status}: {message}")]
    Refused { endpoint: String, status: u16, message: String },
    #[error("etcd {endpoint}: an answer that is not what etcd sends: {message}")]
    Malformed { endpoint: String, message: String },
    #[error("etcd: no endpoint answered ({0})")]
    NoEndpoint(String),
}

/// One key as etcd keeps it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Kv {
    pub key: String,
    pub value: Vec<u8>,
    /// The revision that created it: a fencing epoch for an owner key.
    pub create_revision: i64,
    /// The lease it is attached to (0: none).
    pub lease: i64,
}

/// A client of the endpoints given (`http://HOST:PORT`, checked by the
/// configuration).
#[derive(Debug, Clone)]
pub struct Etcd {
    /// `HOST:PORT` of each endpoint.
    endpoints: Vec<String>,
}

/// `http://HOST:PORT` (a trailing `/` allowed) as `HOST:PORT`; anything else
/// is refused, saying why.
pub fn endpoint_authority(url: &str) -> Result<String, String> {
    let Some(rest) = url.strip_prefix("http://") else {
        return Err(format!(
            "{url:?}: only http:// endpoints are supported (no TLS to etcd yet); give \"http://HOST:PORT\""
        ));
    };
    let authority = rest.trim_end_matches('/');
    if authority.is_empty() || authority.contains('/') || authority.contains('@') {
        return Err(format!("{url:?}: give \"http://HOST:PORT\" with no path"));
    }
    match authority.rsplit_once(':') {
        Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0) => Ok(authority.to_string()),
        _ => Err(format!("{url:?}: the port is missing or not a number (\"http://HOST:PORT\")")),
    }
}

/// The end of the range of keys that start with `prefix` (etcd's
/// `range_end` for a prefix): the prefix with its last byte below 0xff
/// incremented.
fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    // Every byte 0xff (or empty): every key from the prefix on.
    vec![0]
}

/// A 64-bit number of an answer: etcd's gateway writes them as strings,
/// and leaves out fields that are zero.
fn int(value: Option<&Value>) -> Option<i64> {
    match value {
        None | Some(Value::Null) => Some(0),
        Some(Value::String(s)) => s.parse().ok(),
        Some(Value::Number(n)) => n.as_i64(),
        Some(_) => None,
    }
}

impl Etcd {
    /// A client of `urls` (each `http://HOST:PORT`).
    pub fn new(urls: &[String]) -> Result<Etcd, String> {
        let endpoints = urls.iter().map(|u| endpoint_authority(u)).collect::<Result<Vec<_>, _>>()?;
        if endpoints.is_empty() {
            return Err("no etcd endpoint given".into());
        }
        Ok(Etcd { endpoints })
    }

    /// Sends `body` to `path` on each endpoint in turn until one answers
    /// (an answer etcd refused included: another endpoint would refuse it
    /// too); a transport failure moves on to the next.
    async fn call(&self, path: &str, body: &Value) -> Result<Value, EtcdError> {
        let mut failures = Vec::new();
        for endpoint in &self.endpoints {
            match tokio::time::timeout(REQUEST_TIMEOUT, one(endpoint, path, body)).await {
                Ok(Err(e @ EtcdError::Transport { .. })) => failures.push(e.to_string()),
                Ok(answer) => return answer,
                Err(_) => failures.push(format!("{endpoint}: no answer within {REQUEST_TIMEOUT:?}")),
            }
        }
        Err(EtcdError::NoEndpoint(failures.join("; ")))
    }

    /// The keys from `key` (just `key`, or every key under it when `prefix`).
    pub async fn range(&self, key: &str, prefix: bool) -> Result<Vec<Kv>, EtcdError> {
        let mut body = json!({ "key": B64.encode(key) });
        if prefix {
            body["range_end"] = json!(B64.encode(prefix_end(key.as_bytes())));
        }
        let answer = self.call("/v3/kv/range", &body).await?;
        kvs(&answer, self.endpoints.first().map_or("", String::as_str))
    }

    /// Sets `key` to `value`, attached to `lease` (0: none).
    pub async fn put(&self, key: &str, value: &[u8], lease: i64) -> Result<(), EtcdError> {
        let mut body = json!({ "key": B64.encode(key), "value": B64.encode(value) });
        if lease != 0 {
            body["lease"] = json!(lease.to_string());
        }
        self.call("/v3/kv/put", &body).await.map(drop)
    }

    /// Creates `key` with `value` under `lease` if no such key exists (a
    /// transaction comparing its create revision with 0). Returns the key
    /// as it is after: ours when created, the holder's otherwise (`None`
    /// if it was deleted in between).
    pub async fn create(&self, key: &str, value: &[u8], lease: i64) -> Result<(bool, Option<Kv>), EtcdError> {
        let k = B64.encode(key);
        let mut put = json!({ "key": k, "value": B64.encode(value) });
        if lease != 0 {
            put["lease"] = json!(lease.to_string());
        }
        let body = json!({
            "compare": [{ "key": k, "result": "EQUAL", "target": "CREATE", "create_revision": "0" }],
            "success": [{ "request_put": put }],
            "failure": [{ "request_range": { "key": k } }],
        });
        let answer = self.call("/v3/kv/txn", &body).await?;
        let created = answer.get("succeeded").and_then(Value::as_bool).unwrap_or(false);
        let now = if created {
            None
        } else {
            let range = answer
                .get("responses")
                .and_then(Value::as_array)
                .and_then(|r| r.first())
                .and_then(|r| r.get("response_range"));
            match range {
                Some(range) => kvs(range, "txn")?.into_iter().next(),
                None => None,
            }
        };
        Ok((created, now))
    }

    /// Deletes `key` if its create revision is still `revision` (so that a
    /// key someone else created since is left alone). True when deleted.
    pub async fn delete_if(&self, key: &str, revision: i64) -> Result<bool, EtcdError> {
        let k = B64.encode(key);
        let body = json!({
            "compare": [{ "key": k, "result": "EQUAL", "target": "CREATE", "create_revision": revision.to_string() }],
            "success": [{ "request_delete_range": { "key": k } }],
        });
        let answer = self.call("/v3/kv/txn", &body).await?;
        Ok(answer.get("succeeded").and_then(Value::as_bool).unwrap_or(false))
    }

    /// Deletes `key`; true when there was one.
    pub async fn delete(&self, key: &str) -> Result<bool, EtcdError> {
        let answer = self.call("/v3/kv/deleterange", &json!({ "key": B64.encode(key) })).await?;
        Ok(int(answer.get("deleted")).unwrap_or(0) > 0)
    }

    /// A new lease of `ttl` seconds; its id.
    pub async fn grant(&self, ttl: u64) -> Result<i64, EtcdError> {
        let answer = self.call("/v3/lease/grant", &json!({ "TTL": ttl.to_string() })).await?;
        match int(answer.get("ID")) {
            Some(id) if id != 0 => Ok(id),
            _ => {
                Err(EtcdError::Malformed { endpoint: "lease grant".into(), message: format!("no lease id: {answer}") })
            }
        }
    }

    /// Renews `lease`; its TTL now, seconds (0: the lease has expired and
    /// is gone).
    pub async fn keepalive(&self, lease: i64) -> Result<i64, EtcdError> {
        // The gateway streams one answer per request object: one here.
        let answer = self.call("/v3/lease/keepalive", &json!({ "ID": lease.to_string() })).await?;
        let result = answer.get("result").unwrap_or(&answer);
        int(result.get("TTL"))
            .ok_or_else(|| EtcdError::Malformed { endpoint: "lease keepalive".into(), message: answer.to_string() })
    }

    /// Ends `lease` now: every key attached to it goes.
    pub async fn revoke(&self, lease: i64) -> Result<(), EtcdError> {
        self.call("/v3/lease/revoke", &json!({ "ID": lease.to_string() })).await.map(drop)
    }
}

/// The `kvs` of a range answer.
fn kvs(answer: &Value, endpoint: &str) -> Result<Vec<Kv>, EtcdError> {
    let malformed = |message: String| EtcdError::Malformed { endpoint: endpoint.to_string(), message };
    let Some(list) = answer.get("kvs") else { return Ok(Vec::new()) };
    let list = list.as_array().ok_or_else(|| malformed("kvs is not a list".into()))?;
    let field = |kv: &Value, name: &str| -> Result<Vec<u8>, EtcdError> {
        match kv.get(name).and_then(Value::as_str) {
            None => Ok(Vec::new()),
            Some(text) => B64.decode(text).map_err(|e| malformed(format!("{name}: {e}"))),
        }
    };
    list.iter()
        .map(|kv| {
            let key = String::from_utf8(field(kv, "key")?).map_err(|_| malformed("a key that is not UTF-8".into()))?;
            Ok(Kv {
                key,
                value: field(kv, "value")?,
                create_revision: int(kv.get("create_revision")).ok_or_else(|| malformed("create_revision".into()))?,
                lease: int(kv.get("lease")).ok_or_else(|| malformed("lease".into()))?,
            })
        })
        .collect()
}

/// One request to one endpoint, on a connection of its own.
async fn one(endpoint: &str, path: &str, body: &Value) -> Result<Value, EtcdError> {
    let transport = |message: String| EtcdError::Transport { endpoint: endpoint.to_string(), message };
    let stream = TcpStream::connect(endpoint).await.map_err(|e| transport(e.to_string()))?;
    let _ = stream.set_nodelay(true);
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.map_err(|e| transport(e.to_string()))?;
    let driver = tokio::spawn(connection);
    let request = Request::builder()
        .method(Method::POST)
        .uri(path)
        .header(hyper::header::HOST, endpoint)
        .header(hyper::header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(body.to_string())))
        .map_err(|e| transport(e.to_string()))?;
    let answered = async {
        let response = sender.send_request(request).await.map_err(|e| transport(e.to_string()))?;
        let status = response.status();
        let bytes = Limited::new(response.into_body(), MAX_RESPONSE)
            .collect()
            .await
            .map_err(|e| transport(format!("reading the answer (at most {MAX_RESPONSE} bytes): {e}")))?
            .to_bytes();
        Ok::<_, EtcdError>((status, bytes))
    }
    .await;
    driver.abort();
    let (status, bytes) = answered?;
    // A streamed answer (keepalive) is one JSON object per line: the first.
    let text = String::from_utf8_lossy(&bytes);
    let first = text.lines().find(|l| !l.trim().is_empty()).unwrap_or("");
    let value: Value = serde_json::from_str(first).map_err(|e| EtcdError::Malformed {
        endpoint: endpoint.to_string(),
        message: format!("{e}: {}", first.chars().take(200).collect::<String>()),
    })?;
    let error = value.get("error").filter(|e| !e.is_null());
    if !status.is_success() || error.is_some() {
        let message = value
            .get("message")
            .or(error)
            .and_then(Value::as_str)
            .map_or_else(|| value.to_string(), str::to_string)
            .chars()
            .take(500)
            .collect();
        return Err(EtcdError::Refused { endpoint: endpoint.to_string(), status: status.as_u16(), message });
    }
    // A streamed answer wraps its message in `result`.
    Ok(match value.get("result") {
        Some(result) if path != "/v3/lease/keepalive" => result.clone(),
        _ => value,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_are_http_host_port() {
        assert_eq!(endpoint_authority("http://127.0.0.1:2379").unwrap(), "127.0.0.1:2379");
        assert_eq!(endpoint_authority("http://etcd.local:2379/").unwrap(), "etcd.local:2379");
        assert!(endpoint_authority("https://a:1").unwrap_err().contains("only http://"));
        assert!(endpoint_authority("http://a").unwrap_err().contains("port"));
        assert!(endpoint_authority("http://a:x").unwrap_err().contains("port"));
        assert!(endpoint_authority("http://a:1/v3").unwrap_err().contains("no path"));
        assert!(Etcd::new(&[]).is_err());
    }

    #[test]
    fn a_prefix_ends_past_its_last_key() {
        assert_eq!(prefix_end(b"/a/"), b"/a0");
        assert_eq!(prefix_end(b"a\xff"), b"b");
        assert_eq!(prefix_end(b"\xff"), vec![0]);
    }

    #[test]
    fn range_answers_are_read_and_bad_ones_refused() {
        let answer = json!({ "header": {}, "kvs": [
            { "key": B64.encode("/k"), "value": B64.encode("v"), "create_revision": "7", "lease": "42" },
            { "key": B64.encode("/e") },
        ]});
        let kv = kvs(&answer, "e").unwrap();
        assert_eq!(kv[0], Kv { key: "/k".into(), value: b"v".to_vec(), create_revision: 7, lease: 42 });
        assert_eq!(kv[1], Kv { key: "/e".into(), value: Vec::new(), create_revision: 0, lease: 0 });
        assert!(kvs(&json!({}), "e").unwrap().is_empty());
        assert!(kvs(&json!({ "kvs": 5 }), "e").is_err());
        assert!(kvs(&json!({ "kvs": [{ "key": "!!" }] }), "e").is_err());
        assert!(kvs(&json!({ "kvs": [{ "key": "", "lease": "x" }] }), "e").is_err());
    }
}
