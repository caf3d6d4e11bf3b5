//! Life under systemd: socket activation through `systemd-socket-activate`,
//! sd_notify messages on a notify socket, and SIGHUP certificate reloads.

mod common;

use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::systemd::{
    field, free_ports, listening_inodes, socket_activate, socket_activate_on, wait_listening,
    wait_stderr, NotifySocket,
};
use common::{backends, msg, pattern, sha256, tls_connect, Pki, Tcpfwd, BIN};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

const T: Duration = Duration::from_secs(20);

fn is_ready(m: &str) -> bool {
    m.lines().any(|l| l == "READY=1")
}

fn has_line(line: &'static str) -> impl Fn(&str) -> bool {
    move |m: &str| m.lines().any(|l| l == line)
}

/// TLS over an already connected socket.
async fn tls_over(pki: &Pki, tcp: TcpStream) -> TlsStream<TcpStream> {
    tokio_rustls::TlsConnector::from(pki.client_config())
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .unwrap()
}

/// Everything the server sends until it closes.
async fn read_all(mut s: TlsStream<TcpStream>) -> String {
    let mut got = Vec::new();
    s.read_to_end(&mut got).await.unwrap();
    String::from_utf8(got).unwrap()
}

/// The leaf certificate the server presented.
fn served(s: &TlsStream<TcpStream>) -> CertificateDer<'static> {
    s.get_ref().1.peer_certificates().unwrap()[0]
        .clone()
        .into_owned()
}

/// The first certificate in a PEM file.
fn leaf_of(path: &Path) -> CertificateDer<'static> {
    CertificateDer::pem_file_iter(path)
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
}

/// Connects to a port that `wait_listening` has seen listening.
async fn connect(port: u16) -> TcpStream {
    TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap_or_else(|e| panic!("cannot connect to 127.0.0.1:{port}: {e}"))
}

fn args_of(maps: &[String], pki: &Pki) -> Vec<String> {
    let mut args = Vec::new();
    for m in maps {
        args.push("--map".to_string());
        args.push(m.clone());
    }
    args.extend([
        "--cert".to_string(),
        pki.cert.to_str().unwrap().to_string(),
        "--key".to_string(),
        pki.key.to_str().unwrap().to_string(),
    ]);
    args
}

fn strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn socket_activation_by_address_with_two_sockets_and_no_bind_of_its_own() {
    let pki = Pki::new();
    let (a, _) = backends::fixed_reply("127.0.0.1:0", b"backend A").await;
    let (b, _) = backends::fixed_reply("127.0.0.1:0", b"backend B").await;
    let ports = free_ports(2);
    let notify = NotifySocket::new();
    // One .socket unit names all its sockets alike: the names say nothing, addresses decide.
    let args = args_of(
        &[
            format!("127.0.0.1:{}:{a}", ports[0]),
            format!("{}:{b}", ports[1]),
        ],
        &pki,
    );
    let fwd = Tcpfwd::spawn(socket_activate(
        &ports,
        Some("tcpfwd.socket:tcpfwd.socket"),
        &[("NOTIFY_SOCKET", notify.env_value())],
        &strs(&args),
    ));
    let before = wait_listening(fwd.pid(), 2, T);

    // The first connection makes systemd-socket-activate exec tcpfwd; it waits in the backlog.
    let first = connect(ports[0]).await;
    let ready = notify.wait_for_async(is_ready, 1, T).await;
    assert_eq!(
        std::fs::read_link(format!("/proc/{}/exe", fwd.pid())).unwrap(),
        Path::new(BIN).canonicalize().unwrap(),
        "systemd-socket-activate should have exec'd tcpfwd in place"
    );
    // Exactly the two sockets systemd-socket-activate made, nothing bound by tcpfwd itself.
    assert_eq!(listening_inodes(fwd.pid()), before);

    assert_eq!(read_all(tls_over(&pki, first).await).await, "backend A");
    let second = tls_connect(
        pki.client_config(),
        format!("127.0.0.1:{}", ports[1]).parse().unwrap(),
        "localhost",
    )
    .await
    .unwrap();
    assert_eq!(read_all(second).await, "backend B");

    let status = field(&ready[0], "STATUS").unwrap().to_string();
    assert!(
        status.contains(&format!("127.0.0.1:{} -> {a}", ports[0])),
        "{status}"
    );
    assert!(
        status.contains(&format!("127.0.0.1:{} -> {b}", ports[1])),
        "{status}"
    );
    let used = fwd.wait_for(|e| msg(e) == "using the socket passed by systemd", 2, T);
    assert!(used[0]["socket"]
        .as_str()
        .unwrap()
        .contains("name 'tcpfwd.socket'"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fdname_naming_a_port_picks_the_map_over_the_address() {
    let pki = Pki::new();
    let (a, _) = backends::fixed_reply("127.0.0.1:0", b"backend A").await;
    let (b, _) = backends::fixed_reply("127.0.0.1:0", b"backend B").await;
    let ports = free_ports(2);
    let notify = NotifySocket::new();
    // By address, ports[0] would serve A; its name is ports[1], so it serves B, and the other way round.
    let args = args_of(
        &[format!("{}:{a}", ports[0]), format!("{}:{b}", ports[1])],
        &pki,
    );
    let names = format!("{}:{}", ports[1], ports[0]);
    let fwd = Tcpfwd::spawn(socket_activate(
        &ports,
        Some(&names),
        &[("NOTIFY_SOCKET", notify.env_value())],
        &strs(&args),
    ));
    let before = wait_listening(fwd.pid(), 2, T);
    let first = connect(ports[0]).await;
    notify.wait_for_async(is_ready, 1, T).await;
    assert_eq!(listening_inodes(fwd.pid()), before);
    assert_eq!(read_all(tls_over(&pki, first).await).await, "backend B");
    let second = tls_over(&pki, connect(ports[1]).await).await;
    assert_eq!(read_all(second).await, "backend A");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_map_takes_an_ipv4_and_an_ipv6_socket() {
    assert!(
        common::has_ipv6_loopback(),
        "this host has no IPv6 loopback (::1): the IPv6 activation test cannot run here"
    );
    let pki = Pki::new();
    let echo = backends::echo().await;
    let port = free_ports(1)[0];
    let notify = NotifySocket::new();
    let listens = [format!("127.0.0.1:{port}"), format!("[::1]:{port}")];
    let args = args_of(&[format!("{port}:{echo}")], &pki);
    let fwd = Tcpfwd::spawn(socket_activate_on(
        &listens,
        None,
        &[("NOTIFY_SOCKET", notify.env_value())],
        &strs(&args),
    ));
    let before = wait_listening(fwd.pid(), 2, T);
    let first = connect(port).await;
    notify.wait_for_async(is_ready, 1, T).await;
    assert_eq!(listening_inodes(fwd.pid()), before);
    let mut v4 = tls_over(&pki, first).await;
    let mut v6 = tls_connect(
        pki.client_config(),
        format!("[::1]:{port}").parse().unwrap(),
        "localhost",
    )
    .await
    .unwrap();
    for s in [&mut v4, &mut v6] {
        s.write_all(b"both").await.unwrap();
        let mut b = [0u8; 4];
        s.read_exact(&mut b).await.unwrap();
        assert_eq!(&b, b"both");
    }
    let used = fwd.wait_for(|e| msg(e) == "using the socket passed by systemd", 2, T);
    let expected_map = format!("{port}:{echo}");
    assert!(used.iter().all(|e| e["map"] == expected_map.as_str()));
}

/// Runs tcpfwd under systemd-socket-activate expecting a start-up error; returns its stderr.
async fn activation_error(ports: &[u16], maps: &[String]) -> String {
    let pki = Pki::new();
    let mut fwd = Tcpfwd::spawn(socket_activate(
        ports,
        None,
        &[],
        &strs(&args_of(maps, &pki)),
    ));
    wait_listening(fwd.pid(), ports.len(), T);
    // Only to start tcpfwd: it may fail (reset) if tcpfwd exits before connect returns.
    let _trigger = TcpStream::connect(("127.0.0.1", ports[0])).await;
    let status = tokio::task::block_in_place(|| fwd.wait_exit(T)).expect("tcpfwd should exit");
    let err = wait_stderr(&fwd, "tcpfwd: error: ", T);
    assert_eq!(status.code(), Some(2), "{err}");
    err
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_socket_without_a_map_or_a_map_without_a_socket_stops_start_up() {
    let ports = free_ports(3);
    let err = activation_error(&ports[..2], &[format!("{}:127.0.0.1:9", ports[0])]).await;
    assert!(
        err.contains(&format!(
            "systemd passed the socket 127.0.0.1:{} (fd 4), but no --map listens there",
            ports[1]
        )),
        "{err}"
    );

    let err = activation_error(
        &ports[..1],
        &[
            format!("{}:127.0.0.1:9", ports[0]),
            format!("{}:127.0.0.1:9", ports[2]),
        ],
    )
    .await;
    assert!(
        err.contains(&format!(
            "--map '{}:127.0.0.1:9' has no socket from systemd",
            ports[2]
        )),
        "{err}"
    );
    assert!(
        err.contains(&format!("add ListenStream={}", ports[2])),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listen_variables_for_another_process_are_ignored() {
    let pki = Pki::new();
    let echo = backends::echo().await;
    let mut cmd = Tcpfwd::command();
    cmd.args(strs(&args_of(&[format!("127.0.0.1:0:{echo}")], &pki)))
        .env("LISTEN_PID", "1")
        .env("LISTEN_FDS", "2")
        .env("LISTEN_FDNAMES", "a:b");
    let fwd = Tcpfwd::spawn(cmd);
    fwd.wait_for(|e| msg(e) == "listening", 1, T);
    let mut s = tls_connect(pki.client_config(), fwd.addr(0), "localhost")
        .await
        .unwrap();
    s.write_all(b"ping").await.unwrap();
    let mut buf = [0u8; 4];
    s.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"ping");
}

/// `tcpfwd ARGS` started through `sh`, which sets `WATCHDOG_PID` to its own PID
/// before it execs tcpfwd, as systemd sets it to the service's main PID.
fn with_watchdog_pid(env: &[(&str, &str)], args: &[String]) -> Tcpfwd {
    let mut cmd = std::process::Command::new("sh");
    cmd.args(["-c", r#"WATCHDOG_PID=$$ exec "$0" "$@""#, BIN])
        .args(["--log-format", "json", "--log-level", "debug"])
        .args(args)
        .env_remove("RUST_LOG");
    for (k, v) in env {
        cmd.env(k, v);
    }
    Tcpfwd::spawn(cmd)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn notify_ready_status_watchdog_and_stopping() {
    let pki = Pki::new();
    let echo = backends::echo().await;
    let notify = NotifySocket::new();
    let mut fwd = with_watchdog_pid(
        &[
            ("NOTIFY_SOCKET", notify.env_value()),
            ("WATCHDOG_USEC", "200000"),
        ],
        &args_of(&[format!("127.0.0.1:0:{echo}")], &pki),
    );
    let ready = notify.wait_for_async(is_ready, 1, T).await;
    let status = field(&ready[0], "STATUS").unwrap();
    // The log and the notify socket are read by different threads: wait for the log too.
    fwd.wait_for_async(|e| msg(e) == "listening", 1, T).await;
    let addr = fwd.addr(0);
    assert!(
        status.starts_with(&format!("Serving {addr} -> {echo}; certificate ")),
        "{status}"
    );
    assert!(status.contains("CN=tcpfwd test leaf"), "{status}");
    // rcgen's default validity ends in 4096.
    assert!(status.contains(", expires 4096-01-01 (in "), "{status}");
    notify.wait_for_async(has_line("WATCHDOG=1"), 3, T).await;

    fwd.signal(libc::SIGTERM);
    notify.wait_for_async(has_line("STOPPING=1"), 1, T).await;
    let code = tokio::task::block_in_place(|| fwd.wait_exit(T)).expect("exit after SIGTERM");
    assert!(code.success(), "{}", fwd.stderr());
    let all = notify.messages();
    let ready_at = all.iter().position(|m| is_ready(m)).unwrap();
    let stopping_at = all.iter().position(|m| has_line("STOPPING=1")(m)).unwrap();
    assert!(ready_at < stopping_at, "{all:#?}");
    assert!(!all[stopping_at..].iter().any(|m| is_ready(m)), "{all:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abstract_notify_socket_and_a_watchdog_meant_for_another_pid() {
    let pki = Pki::new();
    let echo = backends::echo().await;
    let notify = NotifySocket::new_abstract();
    let mut cmd = Tcpfwd::command();
    cmd.args(strs(&args_of(&[format!("127.0.0.1:0:{echo}")], &pki)))
        .env("NOTIFY_SOCKET", notify.env_value())
        .env("WATCHDOG_USEC", "20000")
        .env("WATCHDOG_PID", "1");
    let mut fwd = Tcpfwd::spawn(cmd);
    notify.wait_for_async(is_ready, 1, T).await;
    // A reload round trip: RELOADING=1, then READY=1 again.
    fwd.signal(libc::SIGHUP);
    notify.wait_for_async(is_ready, 2, T).await;
    fwd.signal(libc::SIGTERM);
    notify.wait_for_async(has_line("STOPPING=1"), 1, T).await;
    assert!(tokio::task::block_in_place(|| fwd.wait_exit(T))
        .unwrap()
        .success());
    let all = notify.messages();
    assert!(
        !all.iter().any(|m| has_line("WATCHDOG=1")(m)),
        "WATCHDOG_PID names another process: {all:#?}"
    );
    assert!(all.iter().any(|m| has_line("RELOADING=1")(m)), "{all:#?}");
}

/// Writes a file as a certificate tool would: a new file renamed into place.
fn replace(path: &Path, from: &Path) {
    let tmp = path.with_extension("new");
    std::fs::copy(from, &tmp).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// tcpfwd serving copies of the PKI's leaf from `dir`, with an echo backend and a notify socket.
async fn reloadable(pki: &Pki, dir: &common::TempDir, notify: &NotifySocket) -> Tcpfwd {
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    replace(&cert, &pki.cert);
    replace(&key, &pki.key);
    let echo = backends::echo().await;
    let mut cmd = Tcpfwd::command();
    cmd.args(["--map", &format!("127.0.0.1:0:{echo}")])
        .args(["--cert", cert.to_str().unwrap()])
        .args(["--key", key.to_str().unwrap()])
        .env("NOTIFY_SOCKET", notify.env_value());
    let fwd = Tcpfwd::spawn(cmd);
    notify.wait_for_async(is_ready, 1, T).await;
    fwd.wait_for_async(|e| msg(e) == "listening", 1, T).await;
    fwd
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_serves_a_new_pair_to_new_handshakes_while_an_open_transfer_continues() {
    let pki = Pki::new();
    let dir = common::TempDir::new("reload");
    let notify = NotifySocket::new();
    let fwd = reloadable(&pki, &dir, &notify).await;
    let old_leaf = leaf_of(&pki.cert);

    // An open transfer through the echo backend, half sent before the reload.
    let data = pattern(11, 8 << 20);
    let half = data.len() / 2;
    let open = tls_connect(pki.client_config(), fwd.addr(0), "localhost")
        .await
        .unwrap();
    assert_eq!(served(&open), old_leaf);
    let (mut r, mut w) = tokio::io::split(open);
    let received = Arc::new(AtomicUsize::new(0));
    let seen = received.clone();
    let reader = tokio::spawn(async move {
        let mut got = Vec::new();
        let mut buf = vec![0u8; 64 << 10];
        loop {
            let n = r.read(&mut buf).await.unwrap();
            if n == 0 {
                break got;
            }
            got.extend_from_slice(&buf[..n]);
            seen.store(got.len(), Ordering::SeqCst);
        }
    });
    w.write_all(&data[..half]).await.unwrap();
    // TLS may hold the tail in its buffer until a flush.
    w.flush().await.unwrap();
    let deadline = Instant::now() + T;
    while received.load(Ordering::SeqCst) < half {
        assert!(Instant::now() < deadline, "the first half never came back");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    let (new_cert, new_key) = pki.leaf("second", &["localhost", "127.0.0.1"]);
    replace(&dir.join("cert.pem"), &new_cert);
    replace(&dir.join("key.pem"), &new_key);
    fwd.signal(libc::SIGHUP);
    let reloading = notify.wait_for_async(has_line("RELOADING=1"), 1, T).await;
    let usec: u64 = field(&reloading[0], "MONOTONIC_USEC")
        .expect("MONOTONIC_USEC with RELOADING=1")
        .parse()
        .unwrap();
    assert!(usec > 0);
    let ready = notify.wait_for_async(is_ready, 2, T).await;
    let status = field(&ready[1], "STATUS").unwrap();
    assert!(status.contains("CN=tcpfwd test second"), "{status}");
    fwd.wait_for(
        |e| msg(e) == "certificate reloaded; new handshakes get it",
        1,
        T,
    );

    let fresh = tls_connect(pki.client_config(), fwd.addr(0), "localhost")
        .await
        .unwrap();
    assert_eq!(served(&fresh), leaf_of(&new_cert));
    drop(fresh);

    w.write_all(&data[half..]).await.unwrap();
    w.shutdown().await.unwrap();
    let got = tokio::time::timeout(T, reader).await.unwrap().unwrap();
    assert_eq!(got.len(), data.len());
    assert_eq!(sha256(&got), sha256(&data));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_with_a_bad_pair_keeps_the_old_certificate_serving() {
    let pki = Pki::new();
    let dir = common::TempDir::new("reload-bad");
    let notify = NotifySocket::new();
    let fwd = reloadable(&pki, &dir, &notify).await;
    let old_leaf = leaf_of(&pki.cert);

    // A new certificate with the old key: they do not belong together.
    let (new_cert, _) = pki.leaf("mismatch", &["localhost"]);
    replace(&dir.join("cert.pem"), &new_cert);
    fwd.signal(libc::SIGHUP);
    let ready = notify.wait_for_async(is_ready, 2, T).await;
    let status = field(&ready[1], "STATUS").unwrap();
    assert!(status.contains("CN=tcpfwd test leaf"), "{status}");
    assert!(status.contains("last reload failed"), "{status}");
    let failed = fwd.wait_for(|e| msg(e).starts_with("reload failed"), 1, T);
    assert!(
        msg(&failed[0]).contains("does not match"),
        "{}",
        msg(&failed[0])
    );

    // A key file that is not there at all.
    std::fs::remove_file(dir.join("key.pem")).unwrap();
    fwd.signal(libc::SIGHUP);
    notify.wait_for_async(is_ready, 3, T).await;
    let failed = fwd.wait_for(|e| msg(e).starts_with("reload failed"), 2, T);
    assert!(
        msg(&failed[1]).contains("cannot read the key file"),
        "{}",
        msg(&failed[1])
    );

    let s = tls_connect(pki.client_config(), fwd.addr(0), "localhost")
        .await
        .unwrap();
    assert_eq!(served(&s), old_leaf);

    // A good pair again: served, and the status forgets the failure.
    let (good_cert, good_key) = pki.leaf("fixed", &["localhost"]);
    replace(&dir.join("key.pem"), &good_key);
    replace(&dir.join("cert.pem"), &good_cert);
    fwd.signal(libc::SIGHUP);
    let ready = notify.wait_for_async(is_ready, 4, T).await;
    let status = field(&ready[3], "STATUS").unwrap();
    assert!(status.contains("CN=tcpfwd test fixed"), "{status}");
    assert!(!status.contains("failed"), "{status}");
    let s = tls_connect(pki.client_config(), fwd.addr(0), "localhost")
        .await
        .unwrap();
    assert_eq!(served(&s), leaf_of(&good_cert));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_with_the_self_signed_default_only_logs_and_keeps_serving() {
    let echo = backends::echo().await;
    let mut fwd = Tcpfwd::start(&["--map", &format!("127.0.0.1:0:{echo}")]);
    fwd.signal(libc::SIGHUP);
    fwd.wait_for_async(|e| msg(e).starts_with("nothing to reload"), 1, T)
        .await;
    assert!(
        fwd.child.try_wait().unwrap().is_none(),
        "SIGHUP ended tcpfwd"
    );
    // Still serving: a handshake gets the self-signed certificate.
    let pki = Pki::new();
    let err = tls_connect(pki.client_config(), fwd.addr(0), "localhost")
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("invalid peer certificate"),
        "the self-signed certificate should be served (and not trusted): {err}"
    );
}
