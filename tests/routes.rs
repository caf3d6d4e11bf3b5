//! Several devices behind one port, chosen by the server name (SNI): exact
//! names, one-level wildcards and a default route, each with its own
//! certificate; without a default, unknown names are refused with an alert.
//! Checked with openssl s_client -servername and curl --resolve.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{backends, free_port, msg, Pki, Tcpfwd};

const T: Duration = Duration::from_secs(20);

fn http_reply(who: &'static str) -> &'static [u8] {
    let body = format!("{who}\n");
    let reply = format!(
        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    Box::leak(reply.into_boxed_str()).as_bytes()
}

/// Three backends behind one port: the DVR (default), the NAS by name, and
/// cameras by wildcard; each route with its own certificate.
async fn three_devices(pki: &Pki) -> (Tcpfwd, u16) {
    let (dvr, _) = backends::fixed_reply("127.0.0.1:0", http_reply("dvr")).await;
    let (nas, _) = backends::fixed_reply("127.0.0.1:0", http_reply("nas")).await;
    let (cams, _) = backends::fixed_reply("127.0.0.1:0", http_reply("cams")).await;
    let (dvr_cert, dvr_key) = pki.leaf("dvr", &["dvr.example.test", "localhost"]);
    let (nas_cert, nas_key) = pki.leaf("nas", &["nas.example.test"]);
    let (cam_cert, cam_key) = pki.leaf("cams", &["*.cams.example.test"]);
    let port = free_port();
    let fwd = Tcpfwd::start(&[
        "--map",
        &format!("127.0.0.1:{port}:{dvr}"),
        "--map",
        &format!("127.0.0.1:{port}:nas.example.test={nas}"),
        "--map",
        &format!("127.0.0.1:{port}:*.cams.example.test={cams}"),
        "--cert",
        dvr_cert.to_str().unwrap(),
        "--key",
        dvr_key.to_str().unwrap(),
        "--cert",
        nas_cert.to_str().unwrap(),
        "--key",
        nas_key.to_str().unwrap(),
        "--cert",
        cam_cert.to_str().unwrap(),
        "--key",
        cam_key.to_str().unwrap(),
    ]);
    (fwd, port)
}

/// `openssl s_client` with `servername` (none: `-noservername`); returns its output.
fn s_client(ca: &Path, port: u16, servername: Option<&str>) -> String {
    let mut cmd = Command::new("openssl");
    cmd.args(["s_client", "-connect", &format!("127.0.0.1:{port}")]);
    match servername {
        Some(n) => cmd.args(["-servername", n]),
        None => cmd.arg("-noservername"),
    };
    let out = cmd
        .args(["-CAfile", ca.to_str().unwrap(), "-ign_eof"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    format!(
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// `curl --resolve NAME:PORT:127.0.0.1 https://NAME:PORT/`, verifying against the test CA.
fn curl(ca: &Path, port: u16, name: &str) -> (bool, String) {
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "10", "--cacert", ca.to_str().unwrap()])
        .args(["--resolve", &format!("{name}:{port}:127.0.0.1")])
        .arg(format!("https://{name}:{port}/"))
        .output()
        .unwrap();
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_backends_behind_one_port_by_server_name() {
    common::require_tool("openssl");
    common::require_tool("curl");
    let pki = Pki::new();
    let (fwd, port) = three_devices(&pki).await;
    assert_eq!(
        fwd.listen_addrs().len(),
        1,
        "one frontend for the three maps"
    );

    let out = tokio::task::spawn_blocking({
        let ca = pki.ca.clone();
        move || {
            [
                s_client(&ca, port, Some("nas.example.test")),
                s_client(&ca, port, Some("front.cams.example.test")),
                s_client(&ca, port, Some("dvr.example.test")),
                s_client(&ca, port, None),
                s_client(&ca, port, Some("printer.example.test")),
            ]
        }
    })
    .await
    .unwrap();
    let [nas, cam, dvr, no_sni, unknown] = &out;
    for (what, text, backend, cn) in [
        ("exact name", nas, "nas", "tcpfwd test nas"),
        ("wildcard", cam, "cams", "tcpfwd test cams"),
        ("default by name", dvr, "dvr", "tcpfwd test dvr"),
        ("no SNI", no_sni, "dvr", "tcpfwd test dvr"),
        ("unknown name", unknown, "dvr", "tcpfwd test dvr"),
    ] {
        assert!(
            text.contains(&format!("\n{backend}\n")),
            "{what}: not from {backend}:\n{text}"
        );
        assert!(
            text.contains(cn),
            "{what}: not the {cn} certificate:\n{text}"
        );
    }
    assert!(nas.contains("Verify return code: 0 (ok)"), "{nas}");
    assert!(cam.contains("Verify return code: 0 (ok)"), "{cam}");

    let curled = tokio::task::spawn_blocking({
        let ca = pki.ca.clone();
        move || {
            [
                curl(&ca, port, "nas.example.test"),
                curl(&ca, port, "a.cams.example.test"),
                curl(&ca, port, "dvr.example.test"),
            ]
        }
    })
    .await
    .unwrap();
    for ((ok, text), want) in curled.iter().zip(["nas\n", "cams\n", "dvr\n"]) {
        assert!(*ok && text == want, "curl wanted {want:?}, got {text:?}");
    }

    let closed = fwd
        .wait_for_async(|e| msg(e) == "connection closed", 8, T)
        .await;
    let routes: Vec<&str> = closed.iter().filter_map(|e| e["route"].as_str()).collect();
    for r in ["nas.example.test", "*.cams.example.test", "default"] {
        assert!(
            routes.contains(&r),
            "no connection logged for route {r}: {routes:?}"
        );
    }
    for e in &closed {
        assert_eq!(e["tls_version"], "TLSv1.3", "{e}");
        assert!(
            e["backend"]
                .as_str()
                .is_some_and(|b| b.starts_with("127.0.0.1:")),
            "{e}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_default_route_unknown_names_are_refused_with_an_alert() {
    common::require_tool("openssl");
    let pki = Pki::new();
    let (nas, hits) = backends::fixed_reply("127.0.0.1:0", http_reply("nas")).await;
    let (cert, key) = pki.leaf("nas", &["nas.example.test"]);
    let port = free_port();
    let fwd = Tcpfwd::start(&[
        "--map",
        &format!("127.0.0.1:{port}:nas.example.test={nas}"),
        "--cert",
        cert.to_str().unwrap(),
        "--key",
        key.to_str().unwrap(),
    ]);
    let ca = pki.ca.clone();
    let (unknown, no_sni, good) = tokio::task::spawn_blocking(move || {
        (
            s_client(&ca, port, Some("printer.example.test")),
            s_client(&ca, port, None),
            s_client(&ca, port, Some("nas.example.test")),
        )
    })
    .await
    .unwrap();
    for text in [&unknown, &no_sni] {
        assert!(
            text.contains("unrecognized name") || text.contains("alert number 112"),
            "no unrecognized_name alert:\n{text}"
        );
        assert!(!text.contains("\nnas\n"), "reached the backend:\n{text}");
    }
    assert!(good.contains("\nnas\n"), "{good}");
    assert_eq!(
        hits.load(std::sync::atomic::Ordering::SeqCst),
        1,
        "only the good one"
    );
    let closed = fwd
        .wait_for_async(|e| msg(e) == "connection closed", 3, T)
        .await;
    let refused: Vec<_> = closed
        .iter()
        .filter(|e| e["reason"] == "unknown server name")
        .collect();
    assert_eq!(refused.len(), 2, "{closed:?}");
    assert!(refused.iter().any(|e| e["sni"] == "printer.example.test"));
}

#[test]
fn a_route_name_no_certificate_covers_stops_start_up() {
    let pki = Pki::new();
    let (cert, key) = pki.leaf("nas", &["nas.example.test"]);
    let port = free_port();
    let (code, out) = common::run_to_exit(&[
        "--map",
        &format!("127.0.0.1:{port}:printer.example.test=127.0.0.1:9"),
        "--cert",
        cert.to_str().unwrap(),
        "--key",
        key.to_str().unwrap(),
    ]);
    assert_eq!(code, 2, "{out}");
    assert!(
        out.contains("route 'printer.example.test'") && out.contains("covered by no certificate"),
        "{out}"
    );
}
