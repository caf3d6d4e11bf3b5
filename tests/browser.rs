//! The founding case in a real browser: headless Chromium loads the DVR page
//! through one map and plays its WebSocket video through the other, over a
//! post-quantum key exchange (X25519MLKEM768).

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{backends, msg, Tcpfwd};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chromium_loads_the_dvr_page_and_plays_the_video() {
    common::require_tool("chromium");
    common::require_tool("node");
    let root = env!("CARGO_MANIFEST_DIR");
    let playwright = format!("{root}/target/browser/node_modules/playwright-core");
    assert!(
        std::path::Path::new(&playwright).exists(),
        "{playwright} is missing: run scripts/test, which installs it"
    );
    let web = backends::dvr_web().await;
    let video = backends::dvr_video(300, 4000).await;
    // The zero-setup default: the in-memory self-signed certificate.
    let fwd = Tcpfwd::start(&[
        "--map",
        &format!("127.0.0.1:0:{web}"),
        "--map",
        &format!("127.0.0.1:0:{video}"),
    ]);
    let url = format!(
        "https://localhost:{}/?ws={}",
        fwd.addr(0).port(),
        fwd.addr(1).port()
    );
    let out = tokio::task::spawn_blocking(move || {
        let mut child = Command::new("node")
            .arg(format!("{root}/tests/browser/dvr.cjs"))
            .arg(&url)
            .env("TCPFWD_PLAYWRIGHT", &playwright)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start node");
        let deadline = Instant::now() + Duration::from_secs(90);
        while child.try_wait().unwrap().is_none() {
            if Instant::now() > deadline {
                let _ = child.kill();
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        child.wait_with_output().unwrap()
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "browser run failed:\n{stdout}\n{stderr}"
    );
    assert!(stdout.contains("status=200"), "{stdout}");
    assert!(stdout.contains("title=DVR"), "{stdout}");
    assert!(stdout.contains("frames=300 bad=0"), "{stdout}\n{stderr}");
    // The browser's connections went through both maps (each waited for by
    // its map: Chromium may open and close spare connections to the page's,
    // which end before a handshake and so have no TLS version).
    for (name, backend) in [("page", web.to_string()), ("video", video.to_string())] {
        let closed = fwd.wait_for(
            move |e| {
                msg(e) == "connection closed"
                    && e["map"].as_str().is_some_and(|m| m.ends_with(&backend))
                    && e["tls_version"] != ""
            },
            1,
            Duration::from_secs(30),
        );
        assert!(!closed.is_empty(), "no connection through the {name} map");
        // Chromium sends an X25519MLKEM768 key share; tcpfwd prefers it.
        for e in &closed {
            assert_eq!(e["kx"], "X25519MLKEM768", "{name} map: {e}");
            assert_eq!(e["tls_version"], "TLSv1.3", "{name} map: {e}");
        }
    }
}
