//! `jobcachefs webhook`: the placement admission webhook. The API server sends it every Pod
//! create of the namespaces its MutatingWebhookConfiguration selects (AdmissionReview v1, POST
//! `/mutate`, HTTPS); it answers with preferred node affinity for the nodes warm for the Pod's
//! caches ([`review`]). It never refuses a Pod: the configuration says `failurePolicy: Ignore`
//! and a short timeout, and every answer here is "allowed".
//!
//! - **TLS** from two PEM files (`--tls-cert`, `--tls-key`): cert-manager's Certificate, or the
//!   Secret `jobcachefs webhook-certs` makes (README "Placement"). The files are read again when
//!   they change (cert-manager renews before expiry), at most once a second, so a renewal needs
//!   no restart.
//! - **HTTP/1.1** with keep-alive, which is what the API server speaks when it is offered no
//!   h2: a request line, headers, a `Content-Length` body of at most [`MAX_BODY`] (the API
//!   server's own limit for a request is 3 MiB). `GET /healthz` answers `ok` for the probes.
//! - **The API** (`get` PVCs, StorageClasses, `list` Nodes) only for PVC and generic ephemeral
//!   volumes and for `required`; classes are remembered for [`CLASS_TTL`]. Without API access
//!   inline CSI volumes are still placed.
//! - One thread per connection, at most [`MAX_CONNECTIONS`]: the API server keeps a few
//!   connections open and reuses them.

pub mod review;

use crate::error::{Error, Result};
use crate::k8s::client::Client;
use review::Claims;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

/// The largest review body read.
pub const MAX_BODY: usize = 4 << 20;
/// Connections served at once.
pub const MAX_CONNECTIONS: usize = 128;
/// How long a StorageClass's answer is remembered.
pub const CLASS_TTL: Duration = Duration::from_secs(60);
/// How long an idle kept-alive connection is kept.
const IDLE: Duration = Duration::from_secs(60);

/// How the webhook runs.
pub struct Options {
    /// `ADDRESS:PORT` to listen on.
    pub listen: String,
    /// PEM certificate chain.
    pub cert: PathBuf,
    /// PEM private key.
    pub key: PathBuf,
    /// The API, for PVCs, classes and Nodes (`None`: inline volumes only).
    pub api: Option<Client>,
}

/// The certificate, read again from its files when they change.
#[derive(Debug)]
struct CertFiles {
    cert: PathBuf,
    key: PathBuf,
    current: Mutex<(Arc<CertifiedKey>, Option<SystemTime>, Instant)>,
}

fn mtime(p: &std::path::Path) -> Option<SystemTime> {
    std::fs::metadata(p).and_then(|m| m.modified()).ok()
}

fn load_cert(cert: &std::path::Path, key: &std::path::Path) -> Result<Arc<CertifiedKey>> {
    let bad = |what: &str, e: &dyn std::fmt::Display| {
        Error::invalid(format!(
            "{what} is unusable: {e}: give PEM files (tls.crt and tls.key of a kubernetes.io/tls Secret)"
        ))
    };
    let pem = std::fs::read(cert)
        .map_err(|e| Error::io(format!("read the certificate {}", cert.display()), e))?;
    let certs = rustls_pemfile::certs(&mut &pem[..])
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| bad(&format!("the certificate {}", cert.display()), &e))?;
    if certs.is_empty() {
        return Err(bad(
            &format!("the certificate {}", cert.display()),
            &"no PEM certificate in it",
        ));
    }
    let pem =
        std::fs::read(key).map_err(|e| Error::io(format!("read the key {}", key.display()), e))?;
    let der = rustls_pemfile::private_key(&mut &pem[..])
        .map_err(|e| bad(&format!("the key {}", key.display()), &e))?
        .ok_or_else(|| {
            bad(
                &format!("the key {}", key.display()),
                &"no PEM private key in it",
            )
        })?;
    let signer = rustls::crypto::ring::sign::any_supported_type(&der)
        .map_err(|e| bad(&format!("the key {}", key.display()), &e))?;
    Ok(Arc::new(CertifiedKey::new(certs, signer)))
}

impl CertFiles {
    fn open(cert: PathBuf, key: PathBuf) -> Result<Self> {
        let loaded = load_cert(&cert, &key)?;
        let seen = mtime(&cert);
        Ok(CertFiles {
            cert,
            key,
            current: Mutex::new((loaded, seen, Instant::now())),
        })
    }
}

impl ResolvesServerCert for CertFiles {
    fn resolve(&self, _hello: ClientHello) -> Option<Arc<CertifiedKey>> {
        let mut cur = self.current.lock().unwrap_or_else(|p| p.into_inner());
        if cur.2.elapsed() >= Duration::from_secs(1) {
            cur.2 = Instant::now();
            let now = mtime(&self.cert);
            if now != cur.1 {
                // A half-written renewal keeps the old certificate until the next look.
                match load_cert(&self.cert, &self.key) {
                    Ok(k) => {
                        tracing::info!(cert = %self.cert.display(), "webhook: certificate reloaded");
                        *cur = (k, now, Instant::now());
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "webhook: the changed certificate does not load yet; serving the previous one")
                    }
                }
            }
        }
        Some(cur.0.clone())
    }
}

/// [`Claims`] answered by the API.
pub struct ApiClaims {
    api: Option<Client>,
    classes: Mutex<HashMap<String, (bool, Instant)>>,
}

impl ApiClaims {
    /// Claims from `api` (`None`: nothing can be told beyond the Pod).
    pub fn new(api: Option<Client>) -> Self {
        ApiClaims {
            api,
            classes: Mutex::new(HashMap::new()),
        }
    }
}

impl Claims for ApiClaims {
    fn class_is_ours(&self, class: &str) -> Option<bool> {
        if let Some((ours, at)) = self.classes.lock().ok()?.get(class) {
            if at.elapsed() < CLASS_TTL {
                return Some(*ours);
            }
        }
        let api = self.api.as_ref()?;
        let ours = match api.storage_class(class) {
            Ok(sc) => review::PROVISIONERS.contains(&sc.provisioner.as_str()),
            Err(e) if e.kind() == crate::ErrorKind::NotFound => false,
            Err(e) => {
                tracing::warn!(class, error = %e, "webhook: could not read the StorageClass");
                return None;
            }
        };
        self.classes
            .lock()
            .ok()?
            .insert(class.to_string(), (ours, Instant::now()));
        Some(ours)
    }

    fn pvc(&self, namespace: &str, name: &str) -> Option<(Option<String>, Option<String>)> {
        match self.api.as_ref()?.pvc(namespace, name) {
            Ok(p) => Some((
                p.spec.storage_class_name,
                p.metadata
                    .annotations
                    .get(crate::k8s::policy::ANNOTATION_CACHE)
                    .cloned(),
            )),
            Err(e) => {
                // A Pod may be created before its PVC: no placement then, as for no cache.
                tracing::info!(pvc = %format!("{namespace}/{name}"), error = %e, "webhook: could not read the PVC");
                None
            }
        }
    }

    fn any_node_has(&self, key: &str) -> Option<bool> {
        let path = format!(
            "/api/v1/nodes?limit=1&labelSelector={}",
            key.replace('/', "%2F")
        );
        match self.api.as_ref()?.get_value(&path, "the cluster's Nodes") {
            Ok(Some(list)) => Some(list["items"].as_array().is_some_and(|i| !i.is_empty())),
            Ok(None) => None,
            Err(e) => {
                tracing::warn!(error = %e, "webhook: could not list Nodes");
                None
            }
        }
    }
}

/// The API client of the webhook, when API access is configured (a service account, or an
/// explicit `KUBECONFIG`). Each read gets [`API_BUDGET`]: the API server waits for the answer.
pub fn api() -> Option<Client> {
    let configured = std::env::var_os("KUBECONFIG").is_some_and(|v| !v.is_empty())
        || std::env::var_os("KUBERNETES_SERVICE_HOST").is_some();
    if !configured {
        tracing::info!("webhook: no Kubernetes API access (no service account, no KUBECONFIG): only inline CSI volumes are placed");
        return None;
    }
    match crate::k8s::kubeconfig::discover().and_then(|t| Client::new(t, API_BUDGET)) {
        Ok(c) => Some(c),
        Err(e) => {
            tracing::warn!(error = %e, "webhook: the Kubernetes API is configured but unusable: only inline CSI volumes are placed");
            None
        }
    }
}

/// How long one API read of a review may take, retries included (the configuration's timeout
/// is 5 s for the whole review).
pub const API_BUDGET: Duration = Duration::from_secs(2);

/// Serves until the process is stopped. Fails only at start: the address, the certificate.
pub fn serve(opts: Options) -> Result<()> {
    let listener = bind(&opts)?;
    let (tls, claims) = prepare(opts)?;
    tracing::info!(addr = %listener.local_addr().map(|a| a.to_string()).unwrap_or_default(), "webhook: serving /mutate");
    run(listener, tls, claims);
    Ok(())
}

/// The listener of `opts`.
pub fn bind(opts: &Options) -> Result<TcpListener> {
    TcpListener::bind(&opts.listen).map_err(|e| {
        Error::io(
            format!("listen on {} for the webhook (--listen)", opts.listen),
            e,
        )
    })
}

/// The TLS configuration and the claims of `opts`.
pub fn prepare(opts: Options) -> Result<(Arc<rustls::ServerConfig>, Arc<ApiClaims>)> {
    let certs = CertFiles::open(opts.cert, opts.key)?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::invalid(format!("the TLS settings: {e}")))?
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(certs));
    tls.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok((Arc::new(tls), Arc::new(ApiClaims::new(opts.api))))
}

/// Accepts connections for ever.
pub fn run(listener: TcpListener, tls: Arc<rustls::ServerConfig>, claims: Arc<ApiClaims>) {
    let open = Arc::new(AtomicUsize::new(0));
    for conn in listener.incoming() {
        let Ok(conn) = conn else { continue };
        if open.load(Ordering::Relaxed) >= MAX_CONNECTIONS {
            // The API server retries on another connection or, at worst, ignores the webhook.
            tracing::warn!("webhook: {MAX_CONNECTIONS} connections open: refusing one");
            continue;
        }
        open.fetch_add(1, Ordering::Relaxed);
        let (tls, claims, open) = (tls.clone(), claims.clone(), open.clone());
        std::thread::spawn(move || {
            if let Err(e) = connection(conn, tls, &*claims) {
                tracing::debug!(error = %e, "webhook: connection ended");
            }
            open.fetch_sub(1, Ordering::Relaxed);
        });
    }
}

/// One connection: requests until it is closed or idle.
fn connection(
    conn: TcpStream,
    tls: Arc<rustls::ServerConfig>,
    claims: &dyn Claims,
) -> std::io::Result<()> {
    conn.set_read_timeout(Some(IDLE))?;
    conn.set_nodelay(true)?;
    let server = rustls::ServerConnection::new(tls).map_err(std::io::Error::other)?;
    let mut stream = BufReader::new(rustls::StreamOwned::new(server, conn));
    loop {
        let mut line = String::new();
        if stream.read_line(&mut line)? == 0 {
            return Ok(());
        }
        let mut length = 0usize;
        let mut close = false;
        loop {
            let mut h = String::new();
            if stream.read_line(&mut h)? == 0 {
                return Ok(());
            }
            let h = h.trim_end();
            if h.is_empty() {
                break;
            }
            if let Some((k, v)) = h.split_once(':') {
                let (k, v) = (k.trim().to_ascii_lowercase(), v.trim());
                if k == "content-length" {
                    length = v.parse().unwrap_or(usize::MAX);
                } else if k == "connection" && v.eq_ignore_ascii_case("close") {
                    close = true;
                }
            }
        }
        let mut parts = line.split_whitespace();
        let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
        let path = target.split('?').next().unwrap_or("");
        let (status, body) = if length > MAX_BODY {
            close = true;
            ("413 Payload Too Large", b"too large\n".to_vec())
        } else {
            let mut body = vec![0u8; length];
            stream.read_exact(&mut body)?;
            match (method, path) {
                ("POST", "/mutate") => ("200 OK", mutate(&body, claims)),
                ("GET", "/healthz") => ("200 OK", b"ok\n".to_vec()),
                _ => ("404 Not Found", b"POST /mutate or GET /healthz\n".to_vec()),
            }
        };
        let out = stream.get_mut();
        write!(
            out,
            "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n{}\r\n",
            body.len(),
            if close { "Connection: close\r\n" } else { "" }
        )?;
        out.write_all(&body)?;
        out.flush()?;
        if close {
            out.conn.send_close_notify();
            let _ = out.flush();
            return Ok(());
        }
    }
}

/// One review: answered, and logged in one line.
fn mutate(body: &[u8], claims: &dyn Claims) -> Vec<u8> {
    let started = Instant::now();
    let (answer, done) = review::answer(body, claims);
    let ms = started.elapsed().as_secs_f64() * 1000.0;
    match (&done.mutation, &done.error) {
        (_, Some(e)) => {
            tracing::warn!(uid = %done.uid, error = %e, "webhook: review not understood: allowed unchanged")
        }
        (Some(m), None) => tracing::info!(
            uid = %done.uid,
            pod = %done.pod,
            outcome = m.outcome.as_str(),
            caches = ?m.caches.iter().map(|c| c.to_string()).collect::<Vec<_>>(),
            ms = format!("{ms:.2}"),
            "webhook: reviewed"
        ),
        (None, None) => {}
    }
    serde_json::to_vec(&answer).expect("plain data serializes")
}
