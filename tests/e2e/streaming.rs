//! Bodies are streamed, never buffered whole: 50 MiB each way through the
//! real `tiergate` binary with its peak memory checked.

use std::time::Duration;

use futures_util::StreamExt;

use crate::common::*;

/// (VmRSS, VmHWM) of a process in KiB.
fn memory_kib(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap()
    };
    (field("VmRSS:"), field("VmHWM:"))
}

const MIB: u64 = 1024 * 1024;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_50mb_upload_and_download_stream_with_flat_gateway_memory() {
    let up = upstream("svc").await;
    let gw = binary_gateway("gateway", 1, up.addr);
    let addr = gw.addr;
    let pid = gw.child.id();
    let c = client();
    // Warm up so baseline includes the connection pools and buffers.
    let _ = c
        .get(format!("http://{addr}/warm"))
        .send()
        .await
        .unwrap()
        .bytes()
        .await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (baseline_rss, _) = memory_kib(pid);

    // Upload 50 MiB produced lazily in 64 KiB chunks.
    let chunk = bytes::Bytes::from(vec![7u8; 64 * 1024]);
    let body = futures_util::stream::iter(
        (0..(50 * 16)).map(move |_| Ok::<_, std::io::Error>(chunk.clone())),
    );
    let resp = c
        .post(format!("http://{addr}/upload"))
        .body(reqwest::Body::wrap_stream(body))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let v: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(v["body_bytes"].as_u64(), Some(50 * MIB));

    // Download 50 MiB, consumed chunk by chunk.
    let resp = c
        .get(format!("http://{addr}/download?download_mb=50"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let mut stream = resp.bytes_stream();
    let mut received = 0u64;
    while let Some(chunk) = stream.next().await {
        received += chunk.unwrap().len() as u64;
    }
    assert_eq!(received, 50 * MIB);

    let (_, peak) = memory_kib(pid);
    let growth_mib = peak.saturating_sub(baseline_rss) / 1024;
    // Buffering either body whole would add ≥ 50 MiB.
    assert!(
        growth_mib < 16,
        "gateway peak memory grew {growth_mib} MiB while streaming 2 × 50 MiB"
    );
}
