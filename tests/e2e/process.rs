//! The `tiergate` process as an operator runs it: starts, serves, stops
//! promptly on Ctrl-C and SIGTERM, refuses a busy port clearly.

use std::process::Command;
use std::time::{Duration, Instant};

use crate::common::*;

async fn stops_promptly_on(command: &str, signal: &str) {
    let up = upstream("svc").await;
    let mut gw = binary_gateway(command, 2, up.addr);
    let (status, v) = get_json(&client(), &format!("http://{}/x", gw.addr)).await;
    assert_eq!(status, 200);
    assert_eq!(backend_of(&v), "svc");
    let sent = Command::new("kill")
        .args([signal, &gw.child.id().to_string()])
        .status()
        .unwrap();
    assert!(sent.success());
    let started = Instant::now();
    loop {
        if let Some(status) = gw.child.try_wait().unwrap() {
            assert!(status.success(), "exit status {status}");
            break;
        }
        if started.elapsed() > Duration::from_secs(8) {
            panic!("tiergate still running 8 s after {signal}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_ctrl_c_stops_the_gateway_promptly() {
    stops_promptly_on("gateway", "-INT").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_up_serves_and_stops_on_ctrl_c() {
    stops_promptly_on("up", "-INT").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_sigterm_stops_the_gateway_promptly() {
    stops_promptly_on("gateway", "-TERM").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_busy_port_is_a_clear_error() {
    let up = upstream("svc").await;
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let file = write_config(port, 2, up.addr);
    let out = Command::new(env!("CARGO_BIN_EXE_tiergate"))
        .args(["gateway", "-c"])
        .arg(&file)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(70));
    if let Some(dir) = file.parent() {
        let _ = std::fs::remove_dir_all(dir);
    }
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!("cannot listen on 127.0.0.1:{port}")),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_gateway_mode_logs_json_and_writes_the_access_log_to_stdout() {
    let up = upstream("svc").await;
    let port = free_port();
    let file = write_config(port, 2, up.addr);
    let child = Command::new(env!("CARGO_BIN_EXE_tiergate"))
        .args(["gateway", "-c"])
        .arg(&file)
        .env_remove("TIERGATE_LOG_FORMAT")
        .env_remove("RUST_LOG")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    wait_for_port(addr);
    let trace = "0af7651916cd43dd8448eb211c80319c";
    let resp = client()
        .get(format!("http://{addr}/x"))
        .header("traceparent", format!("00-{trace}-b7ad6b7169203331-01"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let id = resp.headers()["x-request-id"].to_str().unwrap().to_owned();
    let deadline = Instant::now() + Duration::from_secs(5);
    // The access-log writer flushes as soon as its queue is empty; give it
    // a moment before stopping.
    tokio::time::sleep(Duration::from_millis(200)).await;
    Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(Instant::now() < deadline + Duration::from_secs(10));
    if let Some(dir) = file.parent() {
        let _ = std::fs::remove_dir_all(dir);
    }
    let stderr = String::from_utf8_lossy(&out.stderr);
    let mut messages = Vec::new();
    for line in stderr.lines() {
        let v: serde_json::Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("not a JSON log line ({e}): {line}"));
        assert!(
            v["level"].is_string() && v["timestamp"].is_string(),
            "{line}"
        );
        messages.push(v["message"].as_str().unwrap_or("").to_owned());
    }
    assert!(
        messages.iter().any(|m| m == "tiergate gateway listening"),
        "{stderr}"
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<serde_json::Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 1, "{stdout}");
    assert_eq!(lines[0]["request_id"], id.as_str());
    assert_eq!(lines[0]["trace_id"], trace);
    assert_eq!(lines[0]["status"], 200);
}
