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
