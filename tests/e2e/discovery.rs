//! Backends given by host name: resolved at start and again every
//! `resolve_interval`, through the system resolver or a DNS server. The DNS
//! server here is a stand-in speaking the real wire protocol (RFC 1035) over
//! UDP, so the test can change and break its answers.

use std::net::{Ipv4Addr, SocketAddr, ToSocketAddrs};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::common::{backend_of, client, echo_app, gateway, get_json, json_of, upstream};

/// What the stand-in answers for its name: addresses, or SERVFAIL.
type Answer = Option<Vec<Ipv4Addr>>;

struct DnsStandIn {
    addr: SocketAddr,
    answer: Arc<Mutex<Answer>>,
    queries: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for DnsStandIn {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl DnsStandIn {
    fn set(&self, answer: Answer) {
        *self.answer.lock().unwrap() = answer;
    }
}

/// A DNS server on UDP 127.0.0.1:<ephemeral> authoritative for `name`:
/// A queries get the current answer (TTL 0), AAAA queries none, other
/// names NXDOMAIN.
async fn dns_stand_in(name: &'static str, first: Vec<Ipv4Addr>) -> DnsStandIn {
    let socket = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let addr = socket.local_addr().unwrap();
    let answer = Arc::new(Mutex::new(Some(first)));
    let queries = Arc::new(AtomicUsize::new(0));
    let (a, q) = (answer.clone(), queries.clone());
    let task = tokio::spawn(async move {
        let mut buf = [0u8; 1500];
        loop {
            let Ok((n, peer)) = socket.recv_from(&mut buf).await else {
                continue;
            };
            q.fetch_add(1, Ordering::SeqCst);
            let current = a.lock().unwrap().clone();
            if let Some(reply) = dns_reply(&buf[..n], name, current.as_deref()) {
                let _ = socket.send_to(&reply, peer).await;
            }
        }
    });
    DnsStandIn {
        addr,
        answer,
        queries,
        task,
    }
}

/// The reply to one query, per RFC 1035 §4.1.
fn dns_reply(query: &[u8], name: &str, answer: Option<&[Ipv4Addr]>) -> Option<Vec<u8>> {
    if query.len() < 12 {
        return None;
    }
    // QNAME labels, then QTYPE and QCLASS.
    let mut pos = 12;
    let mut labels = Vec::new();
    loop {
        let len = usize::from(*query.get(pos)?);
        pos += 1;
        if len == 0 {
            break;
        }
        labels.push(String::from_utf8_lossy(query.get(pos..pos + len)?).to_ascii_lowercase());
        pos += len;
    }
    let qtype = u16::from_be_bytes([*query.get(pos)?, *query.get(pos + 1)?]);
    let question_end = pos + 4;
    let asked = labels.join(".");
    let (rcode, records): (u16, &[Ipv4Addr]) = match answer {
        _ if asked != name => (3, &[]),
        None => (2, &[]),
        Some(ips) if qtype == 1 => (0, ips),
        Some(_) => (0, &[]),
    };
    let mut out = Vec::with_capacity(question_end + 16 * records.len());
    out.extend_from_slice(&query[0..2]); // id
    let rd = u16::from_be_bytes([query[2], query[3]]) & 0x0100;
    out.extend_from_slice(&(0x8400 | rd | 0x0080 | rcode).to_be_bytes()); // QR AA RD RA
    out.extend_from_slice(&1u16.to_be_bytes()); // QDCOUNT
    out.extend_from_slice(&(records.len() as u16).to_be_bytes()); // ANCOUNT
    out.extend_from_slice(&[0, 0, 0, 0]); // NSCOUNT, ARCOUNT
    out.extend_from_slice(query.get(12..question_end)?);
    for ip in records {
        out.extend_from_slice(&[0xC0, 0x0C]); // the question's name
        out.extend_from_slice(&[0, 1, 0, 1]); // A, IN
        out.extend_from_slice(&0u32.to_be_bytes()); // TTL 0
        out.extend_from_slice(&4u16.to_be_bytes());
        out.extend_from_slice(&ip.octets());
    }
    Some(out)
}

const NAME: &str = "svc.tiergate.test";

/// Echo upstreams "one" on 127.0.0.1:P and "two" on 127.0.0.2:P.
async fn two_loopback_upstreams() -> (u16, [tokio::task::JoinHandle<()>; 2]) {
    for _ in 0..20 {
        let one = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = one.local_addr().unwrap().port();
        let Ok(two) = tokio::net::TcpListener::bind(("127.0.0.2", port)).await else {
            continue;
        };
        let t1 = tokio::spawn(async move { axum::serve(one, echo_app("one")).await.unwrap() });
        let t2 = tokio::spawn(async move { axum::serve(two, echo_app("two")).await.unwrap() });
        return (port, [t1, t2]);
    }
    panic!("no port free on both 127.0.0.1 and 127.0.0.2");
}

async fn services_pool(gw: &crate::common::TestGateway) -> Value {
    let (_, doc) = get_json(&client(), &gw.admin_url("/health/services")).await;
    doc["pools"][0].clone()
}

fn addresses(pool: &Value) -> Vec<String> {
    pool["backends"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|b| b["draining"] == false)
        .map(|b| b["address"].as_str().unwrap().to_owned())
        .collect()
}

/// Polls `/health/services` until `done` holds for the pool (2 s at most).
async fn wait_pool(gw: &crate::common::TestGateway, what: &str, done: impl Fn(&Value) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        let pool = services_pool(gw).await;
        if done(&pool) {
            return;
        }
        assert!(Instant::now() < deadline, "{what}: {pool}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn backends_serving(gw: &crate::common::TestGateway, n: usize) -> Vec<String> {
    let c = client();
    let mut seen = Vec::new();
    for _ in 0..n {
        let v = json_of(c.get(gw.url("/x"))).await;
        let name = backend_of(&v).to_owned();
        if !seen.contains(&name) {
            seen.push(name);
        }
    }
    seen.sort();
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_dns_name_is_followed_and_its_last_good_set_kept_when_dns_fails() {
    let (port, tasks) = two_loopback_upstreams().await;
    let dns = dns_stand_in(NAME, vec![Ipv4Addr::new(127, 0, 0, 1)]).await;
    let gw = gateway(&format!(
        "dns: {{nameservers: [\"{}\"], timeout: 500ms}}\nupstreams:\n  svc:\n    backends: [{{address: \"{NAME}:{port}\", weight: 3}}]\n    resolve_interval: 100ms\nroutes:\n  - {{name: all, match: {{path: {{prefix: /}}}}, upstream: svc}}\n",
        dns.addr
    ));
    let one = format!("127.0.0.1:{port}");
    let two = format!("127.0.0.2:{port}");
    assert_eq!(backends_serving(&gw, 4).await, ["one"]);
    let pool = services_pool(&gw).await;
    assert_eq!(addresses(&pool), std::slice::from_ref(&one));
    assert_eq!(pool["backends"][0]["weight"], 3, "the entry's weight");
    assert_eq!(pool["names"][0]["name"], format!("{NAME}:{port}"));
    assert_eq!(pool["names"][0]["error"], Value::Null);
    assert!(pool["names"][0]["resolved_at"]
        .as_str()
        .unwrap()
        .ends_with('Z'));

    // The name moves: traffic follows within a few intervals.
    dns.set(Some(vec![Ipv4Addr::new(127, 0, 0, 2)]));
    wait_pool(&gw, "moved to .2", |p| addresses(p) == [two.clone()]).await;
    assert_eq!(backends_serving(&gw, 4).await, ["two"]);

    // Two addresses: two backends, each with the entry's weight.
    dns.set(Some(vec![
        Ipv4Addr::new(127, 0, 0, 1),
        Ipv4Addr::new(127, 0, 0, 2),
    ]));
    wait_pool(&gw, "both", |p| addresses(p) == [one.clone(), two.clone()]).await;
    assert_eq!(backends_serving(&gw, 10).await, ["one", "two"]);

    // DNS fails: the last good set stays and the failure is reported.
    dns.set(None);
    wait_pool(&gw, "error reported", |p| {
        p["names"][0]["error"].is_string()
    })
    .await;
    let pool = services_pool(&gw).await;
    println!("while DNS fails: {}", pool["names"][0]);
    assert_eq!(addresses(&pool), [one.clone(), two.clone()]);
    assert_eq!(pool["names"][0]["addresses"].as_array().unwrap().len(), 2);
    assert_eq!(backends_serving(&gw, 10).await, ["one", "two"]);

    // DNS back: the error clears.
    dns.set(Some(vec![Ipv4Addr::new(127, 0, 0, 1)]));
    wait_pool(&gw, "recovered", |p| {
        p["names"][0]["error"].is_null() && addresses(p) == [one.clone()]
    })
    .await;
    assert!(dns.queries.load(Ordering::SeqCst) >= 5);
    for t in tasks {
        t.abort();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_localhost_backend_resolves_to_its_addresses() {
    let up = upstream("local").await;
    let port = up.addr.port();
    let gw = gateway(&format!(
        "upstreams:\n  svc:\n    backends: [{{address: \"localhost:{port}\"}}]\nroutes:\n  - {{name: all, match: {{path: {{prefix: /}}}}, upstream: svc}}\n"
    ));
    assert_eq!(backends_serving(&gw, 3).await, ["local"]);
    let mut expected: Vec<String> = ("localhost", port)
        .to_socket_addrs()
        .unwrap()
        .map(|a| a.to_string())
        .collect();
    expected.sort();
    expected.dedup();
    let pool = services_pool(&gw).await;
    assert_eq!(addresses(&pool), expected);
    assert_eq!(pool["names"][0]["name"], format!("localhost:{port}"));
    assert_eq!(
        pool["names"][0]["addresses"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a.as_str().unwrap().to_owned())
            .collect::<Vec<_>>(),
        expected
    );
}

#[test]
fn test_stand_in_answers_per_rfc_1035() {
    // A query for svc.tiergate.test A, id 0xBEEF, RD set.
    let mut q = vec![0xBE, 0xEF, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
    for label in NAME.split('.') {
        q.push(label.len() as u8);
        q.extend_from_slice(label.as_bytes());
    }
    q.extend_from_slice(&[0, 0, 1, 0, 1]);
    let r = dns_reply(&q, NAME, Some(&[Ipv4Addr::new(10, 0, 0, 7)])).unwrap();
    assert_eq!(&r[0..2], &[0xBE, 0xEF]);
    assert_eq!(r[3] & 0x0F, 0, "NOERROR");
    assert_eq!(&r[6..8], &[0, 1], "one answer");
    assert_eq!(&r[r.len() - 4..], &[10, 0, 0, 7]);
    let r = dns_reply(&q, NAME, None).unwrap();
    assert_eq!(r[3] & 0x0F, 2, "SERVFAIL");
    let r = dns_reply(&q, "other.test", None).unwrap();
    assert_eq!(r[3] & 0x0F, 3, "NXDOMAIN");
}
