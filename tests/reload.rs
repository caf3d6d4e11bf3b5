//! Live reloads that change routes, backends, certificates and frontends while
//! a 64 MiB transfer runs through the forwarder.
//!
//! Two kinds of tests: `library_*` drive the server and the `Reloader` through
//! the library (configurations built from command-line layers, no file), and
//! `file_*` start the real binary with `--config` and send SIGHUP after
//! rewriting the file.

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use common::{backends, free_port, msg, pattern, sha256, tls_connect, Pki, Tcpfwd, TempDir};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use tcpfwd::config::cli::Cli;
use tcpfwd::config::{layer, Config};
use tcpfwd::net::server::{Limits, Server};
use tcpfwd::service::reload::{Outcome, Reloader};

const T: Duration = Duration::from_secs(20);
const BIG: usize = 64 << 20;
const SEED: u64 = 23;

/// A 64 MiB echo transfer, half sent: the other half waits for `finish`, so
/// the connection is surely open across whatever the test does meanwhile.
struct Transfer {
    go: oneshot::Sender<()>,
    task: JoinHandle<Vec<u8>>,
}

impl Transfer {
    async fn start(cfg: Arc<rustls::ClientConfig>, addr: SocketAddr, name: &str) -> Transfer {
        let s = tls_connect(cfg, addr, name).await.unwrap();
        let (half_tx, half_rx) = oneshot::channel();
        let (go, go_rx) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            let data = pattern(SEED, BIG);
            let (mut r, mut w) = tokio::io::split(s);
            let reader = async {
                let mut got = Vec::with_capacity(BIG);
                r.read_to_end(&mut got).await.unwrap();
                got
            };
            let writer = async {
                w.write_all(&data[..BIG / 2]).await.unwrap();
                let _ = half_tx.send(());
                go_rx.await.unwrap();
                w.write_all(&data[BIG / 2..]).await.unwrap();
                w.shutdown().await.unwrap();
            };
            let (got, ()) = tokio::join!(reader, writer);
            got
        });
        half_rx.await.unwrap();
        Transfer { go, task }
    }

    /// Sends the rest and checks that every byte came back, in order.
    async fn finish(self) {
        self.go.send(()).unwrap();
        let got = tokio::time::timeout(Duration::from_secs(180), self.task)
            .await
            .expect("the transfer did not finish")
            .unwrap();
        assert_eq!(got.len(), BIG, "bytes back from the open transfer");
        assert_eq!(sha256(&got), sha256(&pattern(SEED, BIG)));
    }
}

/// Connects with `name` as SNI and reads until the forwarder closes.
async fn read_all(
    cfg: Arc<rustls::ClientConfig>,
    addr: SocketAddr,
    name: &str,
) -> std::io::Result<Vec<u8>> {
    let mut s = tls_connect(cfg, addr, name).await?;
    let mut got = Vec::new();
    s.read_to_end(&mut got).await?;
    Ok(got)
}

/// The SHA-256 of the certificate a new handshake with `name` gets.
async fn served_fingerprint(
    cfg: Arc<rustls::ClientConfig>,
    addr: SocketAddr,
    name: &str,
) -> String {
    let s = tls_connect(cfg, addr, name).await.unwrap();
    let certs = s.get_ref().1.peer_certificates().unwrap();
    sha256(certs[0].as_ref())
}

/// The SHA-256 of the leaf in a PEM chain file.
fn file_fingerprint(chain: &Path) -> String {
    let leaf = CertificateDer::pem_file_iter(chain)
        .unwrap()
        .next()
        .unwrap()
        .unwrap();
    sha256(leaf.as_ref())
}

/// Whether nothing listens at `addr` any more.
async fn refused(addr: SocketAddr) -> bool {
    matches!(
        tokio::net::TcpStream::connect(addr).await,
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused
    )
}

fn loopback(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

// ---------------------------------------------------------------------------
// Through the library: no configuration file needed.

/// A configuration from command-line arguments (maps on one port share a frontend).
fn config(args: &[String]) -> Config {
    let mut argv = vec!["tcpfwd".to_string()];
    argv.extend(args.iter().cloned());
    let cli = Cli::try_parse_from(argv).unwrap();
    layer::build(None, cli.args().to_layer().unwrap()).unwrap()
}

fn cert_args(pairs: &[(&Path, &Path)]) -> Vec<String> {
    let mut out = Vec::new();
    for (c, k) in pairs {
        out.extend([
            "--cert".into(),
            c.display().to_string(),
            "--key".into(),
            k.display().to_string(),
        ]);
    }
    out
}

fn maps(maps: &[String]) -> Vec<String> {
    maps.iter()
        .flat_map(|m| ["--map".to_string(), m.clone()])
        .collect()
}

/// A server run as `app::run_with` runs it, with its reloader, stopped by
/// sending on `stop`.
struct Running {
    reloader: Reloader,
    stop: oneshot::Sender<()>,
    done: JoinHandle<()>,
}

fn run(config: Config, activated: bool) -> Running {
    let limits = Limits {
        max_connections: 1000,
        shutdown_timeout: Duration::from_secs(30),
        workers: 2,
    };
    let prepared = tcpfwd::app::prepare(config).unwrap();
    let revocations = prepared.ctx.revocations.clone();
    let server = Server::start(prepared.listeners, prepared.ctx, limits).unwrap();
    let reloader = Reloader {
        cli: Default::default(),
        crl_seen: tcpfwd::service::reload::crl_stamps(&prepared.served.config),
        served: prepared.served,
        server: server.handle(),
        activated,
        acme_current: None,
        acme_info: Default::default(),
        revocations,
    };
    let (stop, stopped) = oneshot::channel::<()>();
    let done = tokio::spawn(server.run_until(async {
        let _ = stopped.await;
    }));
    Running {
        reloader,
        stop,
        done,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn library_frontend_added_and_removed_during_a_transfer() {
    let pki = Pki::new();
    let echo = backends::echo().await;
    let (two, _) = backends::fixed_reply("127.0.0.1:0", b"frontend two").await;
    let (p1, p2) = (free_port(), free_port());
    let certs = cert_args(&[(&pki.cert, &pki.key)]);
    let first = [maps(&[format!("127.0.0.1:{p1}:{echo}")]), certs.clone()].concat();
    let mut r = run(config(&first), false);
    let cfg = pki.client_config();

    let transfer = Transfer::start(cfg.clone(), loopback(p1), "localhost").await;
    assert!(refused(loopback(p2)).await, "port two is not served yet");

    // Frontend one removed, frontend two added.
    let second = [maps(&[format!("127.0.0.1:{p2}:{two}")]), certs.clone()].concat();
    let outcome = r.reloader.apply(config(&second)).await.unwrap();
    assert!(matches!(outcome, Outcome::Replaced { .. }), "{outcome:?}");
    for _ in 0..4 {
        // Several connections: they land on both workers' accept loops.
        let got = read_all(cfg.clone(), loopback(p2), "localhost")
            .await
            .unwrap();
        assert_eq!(got, b"frontend two");
    }
    assert!(
        refused(loopback(p1)).await,
        "the removed frontend's port still accepts"
    );
    // The port is free again: another program could bind it.
    drop(std::net::TcpListener::bind(loopback(p1)).unwrap());
    let maps_now = r.reloader.served.status_maps(&r.reloader.server);
    assert_eq!(maps_now, vec![format!("127.0.0.1:{p2} -> {two}")]);

    // A port in use fails the whole reload, and nothing changes.
    let p3 = free_port();
    let squatter = std::net::TcpListener::bind(loopback(p3)).unwrap();
    let third = [
        maps(&[
            format!("127.0.0.1:{p3}:{echo}"),
            format!("127.0.0.1:{p1}:{echo}"),
        ]),
        certs.clone(),
    ]
    .concat();
    let e = r.reloader.apply(config(&third)).await.unwrap_err();
    let e = format!("{e:#}");
    assert!(
        e.contains(&format!("cannot listen on 127.0.0.1:{p3}")),
        "{e}"
    );
    drop(squatter);
    assert!(refused(loopback(p1)).await, "a failed reload bound a port");
    let got = read_all(cfg.clone(), loopback(p2), "localhost")
        .await
        .unwrap();
    assert_eq!(got, b"frontend two", "a failed reload changed what serves");
    assert_eq!(r.reloader.served.frontends.len(), 1);

    transfer.finish().await;

    // Shutdown stops the added frontend's loops too, and ends.
    r.stop.send(()).unwrap();
    tokio::time::timeout(T, r.done).await.unwrap().unwrap();
    assert!(
        refused(loopback(p2)).await,
        "the added frontend outlived shutdown"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn library_routes_backends_and_certificates_change_for_new_connections_only() {
    let pki = Pki::new();
    let echo = backends::echo().await;
    let (a, _) = backends::fixed_reply("127.0.0.1:0", b"nas one").await;
    let (b, _) = backends::fixed_reply("127.0.0.1:0", b"nas two").await;
    let (c, _) = backends::fixed_reply("127.0.0.1:0", b"cams").await;
    let (names_cert, names_key) = pki.leaf("names", &["nas.test", "cams.test"]);
    let (new_cert, new_key) = pki.leaf("renewed", &["localhost", "127.0.0.1"]);
    let p = free_port();
    let first = [
        maps(&[
            format!("127.0.0.1:{p}:{echo}"),
            format!("127.0.0.1:{p}:nas.test={a}"),
        ]),
        cert_args(&[(&pki.cert, &pki.key), (&names_cert, &names_key)]),
    ]
    .concat();
    let mut r = run(config(&first), false);
    let cfg = pki.client_config();
    let addr = loopback(p);
    assert_eq!(
        read_all(cfg.clone(), addr, "nas.test").await.unwrap(),
        b"nas one"
    );
    let before = served_fingerprint(cfg.clone(), addr, "localhost").await;
    assert_eq!(before, file_fingerprint(&pki.cert));

    let transfer = Transfer::start(cfg.clone(), addr, "localhost").await;
    // nas.test to another backend, cams.test added, the first certificate replaced.
    let second = [
        maps(&[
            format!("127.0.0.1:{p}:{echo}"),
            format!("127.0.0.1:{p}:nas.test={b}"),
            format!("127.0.0.1:{p}:cams.test={c}"),
        ]),
        cert_args(&[(&new_cert, &new_key), (&names_cert, &names_key)]),
    ]
    .concat();
    let outcome = r.reloader.apply(config(&second)).await.unwrap();
    let Outcome::Replaced { sha256, .. } = outcome else {
        panic!("{outcome:?}")
    };
    // The log's form: upper-case hex pairs with colons.
    let logged = sha256.unwrap().replace(':', "").to_ascii_lowercase();
    assert_eq!(logged, file_fingerprint(&new_cert));
    assert_eq!(
        read_all(cfg.clone(), addr, "nas.test").await.unwrap(),
        b"nas two"
    );
    assert_eq!(
        read_all(cfg.clone(), addr, "cams.test").await.unwrap(),
        b"cams"
    );
    let after = served_fingerprint(cfg.clone(), addr, "localhost").await;
    assert_eq!(after, file_fingerprint(&new_cert));

    // nas.test's route removed and no default route: its name is refused
    // with the TLS alert, while the open transfer (default route) goes on.
    let third = [
        maps(&[format!("127.0.0.1:{p}:localhost={echo}")]),
        cert_args(&[(&new_cert, &new_key)]),
    ]
    .concat();
    r.reloader.apply(config(&third)).await.unwrap();
    let e = read_all(cfg.clone(), addr, "nas.test").await.unwrap_err();
    assert!(format!("{e}").contains("UnrecognisedName"), "{e}");

    transfer.finish().await;
    r.stop.send(()).unwrap();
    tokio::time::timeout(T, r.done).await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn library_socket_activation_cannot_add_a_frontend() {
    let pki = Pki::new();
    let (echo, _) = backends::fixed_reply("127.0.0.1:0", b"still here").await;
    let (p1, p2) = (free_port(), free_port());
    let certs = cert_args(&[(&pki.cert, &pki.key)]);
    let first = [maps(&[format!("127.0.0.1:{p1}:{echo}")]), certs.clone()].concat();
    // Bound by the test; the reloader is told the sockets came from systemd.
    let mut r = run(config(&first), true);
    let second = [
        maps(&[
            format!("127.0.0.1:{p1}:{echo}"),
            format!("127.0.0.1:{p2}:{echo}"),
        ]),
        certs,
    ]
    .concat();
    let e = format!("{:#}", r.reloader.apply(config(&second)).await.unwrap_err());
    assert!(
        e.contains(&format!(
            "frontend 127.0.0.1:{p2} has no socket from systemd; add ListenStream=127.0.0.1:{p2}"
        )),
        "{e}"
    );
    assert!(refused(loopback(p2)).await);
    let got = read_all(pki.client_config(), loopback(p1), "localhost").await;
    assert_eq!(got.unwrap(), b"still here");
    r.stop.send(()).unwrap();
    tokio::time::timeout(T, r.done).await.unwrap().unwrap();
}

// ---------------------------------------------------------------------------
// The real binary with `--config` and SIGHUP. These need the configuration
// file parser (`config::file::load`).

/// One route of a frontend in the file: server names (none: the default) and backend.
type FileRoute<'a> = (&'a [&'a str], SocketAddr);

/// Writes the file in the documented format.
fn write_file(path: &Path, frontends: &[(u16, &[FileRoute])], certs: &[(&Path, &Path)]) {
    let mut s = String::new();
    for (port, routes) in frontends {
        s.push_str(&format!("[[frontend]]\nlisten = \"127.0.0.1:{port}\"\n"));
        for (names, backend) in routes.iter() {
            s.push_str("  [[frontend.route]]\n");
            if !names.is_empty() {
                let quoted: Vec<String> = names.iter().map(|n| format!("\"{n}\"")).collect();
                s.push_str(&format!("  sni = [{}]\n", quoted.join(", ")));
            }
            s.push_str(&format!("  backend = \"{backend}\"\n"));
        }
    }
    for (cert, key) in certs {
        s.push_str(&format!(
            "[[cert]]\ncert = \"{}\"\nkey = \"{}\"\n",
            cert.display(),
            key.display()
        ));
    }
    // Written whole and renamed, as an editor or a deploy tool would.
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, s).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

fn start_with_file(path: &Path) -> Tcpfwd {
    let mut cmd = Tcpfwd::command();
    cmd.arg("--config").arg(path).args(["--threads", "2"]);
    let fwd = Tcpfwd::spawn(cmd);
    fwd.wait_for(|e| msg(e) == "ready", 1, T);
    fwd
}

fn reload_done(e: &Value) -> bool {
    let m = msg(e);
    m == "configuration reloaded; new connections get it" || m.starts_with("reload failed")
}

/// Sends SIGHUP and returns the `n`th reload's outcome event (1-based).
async fn sighup(fwd: &Tcpfwd, n: usize) -> Value {
    fwd.signal(libc::SIGHUP);
    let ev = fwd.wait_for_async(reload_done, n, T).await;
    ev[n - 1].clone()
}

fn config_path(dir: &TempDir) -> PathBuf {
    dir.join("tcpfwd.toml")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn file_backend_route_and_certificate_changes_during_a_transfer() {
    let pki = Pki::new();
    let dir = TempDir::new("reload-file");
    let path = config_path(&dir);
    let echo = backends::echo().await;
    let (a, _) = backends::fixed_reply("127.0.0.1:0", b"nas one").await;
    let (b, _) = backends::fixed_reply("127.0.0.1:0", b"nas two").await;
    let (c, _) = backends::fixed_reply("127.0.0.1:0", b"cams").await;
    let (names_cert, names_key) = pki.leaf("names", &["nas.test", "cams.test"]);
    let (new_cert, new_key) = pki.leaf("renewed", &["localhost", "127.0.0.1"]);
    let p = free_port();
    let addr = loopback(p);
    write_file(
        &path,
        &[(p, &[(&[], echo), (&["nas.test"], a)])],
        &[(&pki.cert, &pki.key), (&names_cert, &names_key)],
    );
    let fwd = start_with_file(&path);
    let cfg = pki.client_config();
    assert_eq!(
        read_all(cfg.clone(), addr, "nas.test").await.unwrap(),
        b"nas one"
    );

    let transfer = Transfer::start(cfg.clone(), addr, "localhost").await;
    write_file(
        &path,
        &[(p, &[(&[], echo), (&["nas.test"], b), (&["cams.test"], c)])],
        &[(&new_cert, &new_key), (&names_cert, &names_key)],
    );
    let ev = sighup(&fwd, 1).await;
    assert_eq!(
        msg(&ev),
        "configuration reloaded; new connections get it",
        "{ev}"
    );
    assert_eq!(
        read_all(cfg.clone(), addr, "nas.test").await.unwrap(),
        b"nas two"
    );
    assert_eq!(
        read_all(cfg.clone(), addr, "cams.test").await.unwrap(),
        b"cams"
    );
    assert_eq!(
        served_fingerprint(cfg.clone(), addr, "localhost").await,
        file_fingerprint(&new_cert)
    );
    transfer.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn file_route_removed_refuses_its_name_and_the_open_transfer_finishes() {
    let pki = Pki::new();
    let dir = TempDir::new("reload-route");
    let path = config_path(&dir);
    let echo = backends::echo().await;
    let (web, _) = backends::fixed_reply("127.0.0.1:0", b"web").await;
    let (names_cert, names_key) = pki.leaf("names", &["nas.test"]);
    let certs: [(&Path, &Path); 2] = [(&pki.cert, &pki.key), (&names_cert, &names_key)];
    let p = free_port();
    let addr = loopback(p);
    // No default route: a name without a route is refused.
    write_file(
        &path,
        &[(p, &[(&["localhost"], web), (&["nas.test"], echo)])],
        &certs,
    );
    let fwd = start_with_file(&path);
    let cfg = pki.client_config();
    let transfer = Transfer::start(cfg.clone(), addr, "nas.test").await;

    write_file(&path, &[(p, &[(&["localhost"], web)])], &certs);
    let ev = sighup(&fwd, 1).await;
    assert_eq!(
        msg(&ev),
        "configuration reloaded; new connections get it",
        "{ev}"
    );
    let e = read_all(cfg.clone(), addr, "nas.test").await.unwrap_err();
    assert!(format!("{e}").contains("UnrecognisedName"), "{e}");
    assert_eq!(
        read_all(cfg.clone(), addr, "localhost").await.unwrap(),
        b"web"
    );
    transfer.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn file_frontend_added_and_removed_during_a_transfer() {
    let pki = Pki::new();
    let dir = TempDir::new("reload-frontends");
    let path = config_path(&dir);
    let echo = backends::echo().await;
    let (two, _) = backends::fixed_reply("127.0.0.1:0", b"frontend two").await;
    let certs: [(&Path, &Path); 1] = [(&pki.cert, &pki.key)];
    let (p1, p2) = (free_port(), free_port());
    write_file(&path, &[(p1, &[(&[], echo)])], &certs);
    let fwd = start_with_file(&path);
    let cfg = pki.client_config();
    let transfer = Transfer::start(cfg.clone(), loopback(p1), "localhost").await;
    assert!(refused(loopback(p2)).await);

    write_file(&path, &[(p2, &[(&[], two)])], &certs);
    let ev = sighup(&fwd, 1).await;
    assert_eq!(
        msg(&ev),
        "configuration reloaded; new connections get it",
        "{ev}"
    );
    let added = fwd.wait_for(|e| msg(e) == "frontend added; listening", 1, T);
    assert_eq!(added[0]["addr"], format!("127.0.0.1:{p2}"));
    let removed = fwd.wait_for(|e| msg(e).starts_with("frontend removed"), 1, T);
    assert_eq!(removed[0]["addr"], format!("127.0.0.1:{p1}"));
    for _ in 0..4 {
        let got = read_all(cfg.clone(), loopback(p2), "localhost")
            .await
            .unwrap();
        assert_eq!(got, b"frontend two");
    }
    assert!(
        refused(loopback(p1)).await,
        "the removed frontend still accepts"
    );
    transfer.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn file_that_does_not_load_keeps_the_running_configuration() {
    let pki = Pki::new();
    let dir = TempDir::new("reload-broken");
    let path = config_path(&dir);
    let (one, _) = backends::fixed_reply("127.0.0.1:0", b"one").await;
    let (other, _) = backends::fixed_reply("127.0.0.1:0", b"other").await;
    let certs: [(&Path, &Path); 1] = [(&pki.cert, &pki.key)];
    let p = free_port();
    write_file(&path, &[(p, &[(&[], one)])], &certs);
    let fwd = start_with_file(&path);
    let cfg = pki.client_config();

    // Not TOML.
    std::fs::write(&path, "[[frontend]\nlisten = \n").unwrap();
    let ev = sighup(&fwd, 1).await;
    let m = msg(&ev).to_string();
    assert!(m.starts_with("reload failed"), "{ev}");
    assert!(
        m.contains(&path.display().to_string()),
        "the log says which file: {m}"
    );
    assert_eq!(
        read_all(cfg.clone(), loopback(p), "localhost")
            .await
            .unwrap(),
        b"one"
    );

    // A frontend on a port in use: the whole reload fails, the route change too.
    let busy = free_port();
    let squatter = std::net::TcpListener::bind(loopback(busy)).unwrap();
    write_file(
        &path,
        &[(p, &[(&[], other)]), (busy, &[(&[], other)])],
        &certs,
    );
    let ev = sighup(&fwd, 2).await;
    let m = msg(&ev).to_string();
    assert!(m.starts_with("reload failed"), "{ev}");
    assert!(
        m.contains(&format!("cannot listen on 127.0.0.1:{busy}")),
        "{m}"
    );
    assert_eq!(
        read_all(cfg.clone(), loopback(p), "localhost")
            .await
            .unwrap(),
        b"one"
    );
    drop(squatter);

    // Fixed: it applies.
    write_file(&path, &[(p, &[(&[], other)])], &certs);
    let ev = sighup(&fwd, 3).await;
    assert_eq!(
        msg(&ev),
        "configuration reloaded; new connections get it",
        "{ev}"
    );
    assert_eq!(
        read_all(cfg.clone(), loopback(p), "localhost")
            .await
            .unwrap(),
        b"other"
    );
}
