//! The `tiergate` process as an operator runs it: starts, serves, stops
//! promptly on Ctrl-C and SIGTERM, refuses a busy port clearly.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::common::*;

fn write_config(port: u16, upstream: std::net::SocketAddr) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("tiergate-proc-{port}"));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("tiergate.yaml");
    std::fs::write(
        &file,
        format!(
            "server:\n  listen: [\"127.0.0.1:{port}\"]\n  threads: 2\nupstreams:\n  svc: {{ backends: [{{ address: \"{upstream}\" }}] }}\nroutes:\n  - {{ name: all, match: {{ path: {{ prefix: / }} }}, upstream: svc }}\n"
        ),
    )
    .unwrap();
    file
}

async fn stops_promptly_on(signal: &str) {
    let up = upstream("svc").await;
    let port = free_port();
    let file = write_config(port, up.addr);
    let mut child = Command::new(env!("CARGO_BIN_EXE_tiergate"))
        .args(["gateway", "-c"])
        .arg(&file)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let addr = format!("127.0.0.1:{port}").parse().unwrap();
    wait_for_port(addr);
    let (status, v) = get_json(&client(), &format!("http://{addr}/x")).await;
    assert_eq!(status, 200);
    assert_eq!(backend_of(&v), "svc");
    let sent = Command::new("kill")
        .args([signal, &child.id().to_string()])
        .status()
        .unwrap();
    assert!(sent.success());
    let started = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            assert!(status.success(), "exit status {status}");
            break;
        }
        if started.elapsed() > Duration::from_secs(8) {
            let _ = child.kill();
            panic!("tiergate still running 8 s after {signal}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_ctrl_c_stops_the_gateway_promptly() {
    stops_promptly_on("-INT").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_sigterm_stops_the_gateway_promptly() {
    stops_promptly_on("-TERM").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_busy_port_is_a_clear_error() {
    let up = upstream("svc").await;
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let file = write_config(port, up.addr);
    let out = Command::new(env!("CARGO_BIN_EXE_tiergate"))
        .args(["gateway", "-c"])
        .arg(&file)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(70));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!("cannot listen on 127.0.0.1:{port}")),
        "{err}"
    );
}
